'use strict';
/*
 * The relay benchmark's load generator: "browsers" in a process of their own
 * (Node.js and the npm package `ws`, from bench/.peers; NODE_PATH points there).
 *
 *   node bench/loadgen.js '<json spec>'
 *
 * prints one JSON line of results (the hold command prints one when all its
 * sessions are open, then one per "count" line read on stdin, and exits when
 * stdin closes).  The spec names a command and a target:
 *
 *   command:  throughput | latency | setup | hold | rfb
 *   target.kind:
 *     consoleproxy      token from GET /api/vm/<vm>/guacamole/vnc (HTTP Basic), then
 *                       ws://.../guacamole?token=... (subprotocol guacamole)
 *     guacamole-lite    an AES-256-CBC token made here, then ws://.../?token=...
 *     direct            the fake guacd itself over TCP: this process does the handshake
 *     consoleproxy-rfb  token with ?mode=rfb, then ws://.../rfb?token=... (binary)
 *     websockify        ws://.../ (binary); the RFB handshake is with the VNC server
 *     rfb-direct        the fake VNC server itself over TCP
 *
 * Every Guacamole session is "set up" once its first instruction arrives
 * (consoleproxy's tunnel UUID, guacamole-lite's connection id, guacd's ready);
 * every RFB session once the ServerInit has arrived.  The first megabyte each
 * session receives after that is parsed to check the framing survived the relay.
 */

const net = require('net');
const http = require('http');
const crypto = require('crypto');
const WebSocket = require('ws');

const spec = JSON.parse(process.argv[2]);
const target = spec.target;
const CHECK_BYTES = 1 << 20;
const NOP = '3.nop;';

const now = () => Number(process.hrtime.bigint()) / 1e6; // milliseconds
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const encode = (...elements) => elements.map((e) => `${e.length}.${e}`).join(',') + ';';

function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function percentile(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : null;
}

// -- Guacamole parsing (ASCII streams) -----------------------------------------------

/** Incremental parser: feed strings, get whole instructions as element arrays. */
class GuacParser {
  constructor() {
    this.pending = '';
  }

  feed(text) {
    const buffer = this.pending + text;
    const done = [];
    let start = 0;
    for (;;) {
      const elements = [];
      let i = start;
      let complete = false;
      for (;;) {
        const dot = buffer.indexOf('.', i);
        if (dot < 0) break;
        const length = Number(buffer.slice(i, dot));
        if (!Number.isInteger(length) || dot === i) throw new Error(`bad length at ${i}`);
        const end = dot + 1 + length;
        if (end >= buffer.length) break;
        elements.push(buffer.slice(dot + 1, end));
        i = end + 1;
        if (buffer[end] === ';') {
          complete = true;
          break;
        }
        if (buffer[end] !== ',') throw new Error(`bad terminator ${JSON.stringify(buffer[end])}`);
      }
      if (!complete) break;
      done.push(elements);
      start = i;
    }
    this.pending = buffer.slice(start);
    return done;
  }
}

const GUAC_OPCODES = new Set(['img', 'blob', 'end', 'sync', 'rect', 'cfill', 'copy', 'cursor',
  'move', 'mouse', 'nop', 'echo']);

/** Checks the framing of the first CHECK_BYTES of a Guacamole stream. */
class GuacChecker {
  constructor(stats) {
    this.parser = new GuacParser();
    this.seen = 0;
    this.stats = stats;
  }

  feed(buf) {
    if (this.seen >= CHECK_BYTES || this.stats.error) return;
    this.seen += buf.length;
    try {
      for (const parts of this.parser.feed(buf.toString('latin1'))) {
        this.stats.instructions += 1;
        if (!GUAC_OPCODES.has(parts[0])) throw new Error(`unexpected opcode ${parts[0]}`);
        if (parts[0] === 'blob' && parts[2].length !== 8064) throw new Error('blob cut');
      }
    } catch (e) {
      this.stats.error = String(e.message || e);
    }
  }
}

/** Checks the framing of the first CHECK_BYTES of FramebufferUpdates (raw rects). */
class RfbChecker {
  constructor(stats) {
    this.stats = stats;
    this.pending = Buffer.alloc(0);
    this.seen = 0;
    this.skip = 0;
    this.rects = 0;
  }

  feed(buf) {
    if (this.seen >= CHECK_BYTES || this.stats.error) return;
    this.seen += buf.length;
    let data = Buffer.concat([this.pending, buf]);
    for (;;) {
      if (this.skip) {
        const n = Math.min(this.skip, data.length);
        this.skip -= n;
        data = data.subarray(n);
        if (this.skip) break;
      }
      if (this.rects === 0) {
        if (data.length < 4) break;
        if (data[0] !== 0) {
          this.stats.error = `message type ${data[0]}, not FramebufferUpdate`;
          return;
        }
        this.rects = data.readUInt16BE(2);
        this.stats.instructions += 1;
        data = data.subarray(4);
      } else {
        if (data.length < 12) break;
        const w = data.readUInt16BE(4);
        const h = data.readUInt16BE(6);
        if (data.readInt32BE(8) !== 0) {
          this.stats.error = 'not a raw rectangle';
          return;
        }
        this.skip = w * h * 4;
        this.rects -= 1;
        data = data.subarray(12);
      }
    }
    this.pending = Buffer.from(data);
  }
}

// -- links: a WebSocket or a TCP socket ----------------------------------------------

function httpJson(path) {
  return new Promise((resolve, reject) => {
    const auth = Buffer.from(`${target.user}:${target.password}`).toString('base64');
    const request = http.get(
      { host: '127.0.0.1', port: target.port, path, agent, headers: { Authorization: `Basic ${auth}` } },
      (response) => {
        const chunks = [];
        response.on('data', (c) => chunks.push(c));
        response.on('end', () => {
          try {
            const body = JSON.parse(Buffer.concat(chunks).toString());
            if (response.statusCode !== 200) reject(new Error(`token API ${response.statusCode}: ${body.data}`));
            else resolve(body.data);
          } catch (e) {
            reject(e);
          }
        });
      },
    );
    request.on('error', reject);
  });
}

const agent = new http.Agent({ keepAlive: true, maxSockets: spec.concurrency || 16 });

function guacamoleLiteToken(workload) {
  const iv = crypto.randomBytes(16);
  const cipher = crypto.createCipheriv('aes-256-cbc', Buffer.from(target.key), iv);
  const settings = { connection: { type: 'vnc', settings: { hostname: workload, port: '5900' } } };
  const value = Buffer.concat([cipher.update(JSON.stringify(settings), 'utf8'), cipher.final()]);
  const json = JSON.stringify({ iv: iv.toString('base64'), value: value.toString('base64') });
  return Buffer.from(json).toString('base64');
}

/** The URL (and subprotocol) of a new session; makes its token. */
async function sessionUrl(workload) {
  const base = `ws://127.0.0.1:${target.port}`;
  const display = 'width=1024&height=768&dpi=96';
  switch (target.kind) {
    case 'consoleproxy': {
      const token = await httpJson(`/api/vm/${target.vms[workload]}/guacamole/vnc`);
      return [`${base}/guacamole?token=${encodeURIComponent(token)}&${display}`, 'guacamole'];
    }
    case 'guacamole-lite':
      return [`${base}/?token=${encodeURIComponent(guacamoleLiteToken(workload))}&${display}`, 'guacamole'];
    case 'consoleproxy-rfb': {
      const token = await httpJson(`/api/vm/${target.vms.rfb}/guacamole/vnc?mode=rfb`);
      return [`${base}/rfb?token=${encodeURIComponent(token)}`, 'binary'];
    }
    case 'websockify':
      return [`${base}/`, 'binary'];
    default:
      throw new Error(`no URL for ${target.kind}`);
  }
}

/**
 * A byte link to the target: {write, close, ondata, onclose, closed}; WebSocket
 * messages or TCP reads arrive as Buffers through ondata (see L{listen}), kept in
 * early until there is one.
 */
function wsLink(url, protocol) {
  return new Promise((resolve, reject) => {
    const origin = `http://127.0.0.1:${target.port}`; // a page of the server itself
    const ws = new WebSocket(url, [protocol], { perMessageDeflate: false, handshakeTimeout: 60000, origin });
    const link = {
      binary: protocol === 'binary',
      early: [],
      ondata: null,
      closed: false,
      write(data) {
        if (ws.readyState === WebSocket.OPEN) ws.send(data, { binary: this.binary });
      },
      close() {
        ws.terminate();
      },
    };
    ws.on('open', () => resolve(link));
    ws.on('message', (data) => (link.ondata ? link.ondata(data) : link.early.push(data)));
    ws.on('close', (code, reason) => {
      link.closed = true;
      if (link.onclose) link.onclose(`closed ${code} ${reason}`);
      reject(new Error(`closed before open (${code} ${reason})`));
    });
    ws.on('error', (e) => reject(e));
  });
}

function tcpLink(port) {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.setNoDelay(true);
    const link = {
      early: [],
      ondata: null,
      closed: false,
      write(data) {
        socket.write(data);
      },
      close() {
        socket.destroy();
      },
    };
    socket.on('connect', () => resolve(link));
    socket.on('data', (data) => (link.ondata ? link.ondata(data) : link.early.push(data)));
    socket.on('close', () => {
      link.closed = true;
      if (link.onclose) link.onclose('closed');
    });
    socket.on('error', (e) => reject(e));
  });
}

// -- sessions ------------------------------------------------------------------------

/** Deliver a link's data to C{fn} from now on, starting with any that came early. */
function listen(link, fn) {
  link.ondata = fn;
  // Through link.ondata: a handler may hand over to another one midway.
  while (link.early.length) link.ondata(link.early.shift());
}

/** From now on, keep what arrives in C{extra} until the caller takes over. */
function keep(link, extra, leftover) {
  if (leftover && leftover.length) extra.push(leftover);
  link.ondata = (buf) => extra.push(buf);
}

/** Wait for the first instruction (relays), or do guacd's handshake (direct). */
function guacReady(link, workload, extra) {
  return new Promise((resolve, reject) => {
    link.onclose = (why) => reject(new Error(`${why} before ready`));
    if (target.kind !== 'direct') {
      listen(link, () => {
        keep(link, extra);
        resolve();
      });
      return;
    }
    const parser = new GuacParser();
    let phase = 'args';
    listen(link, (buf) => {
      const instructions = parser.feed(buf.toString('latin1'));
      for (let k = 0; k < instructions.length; k += 1) {
        const parts = instructions[k];
        if (phase === 'args') {
          const values = parts.slice(2).map((name) => (name === 'hostname' ? workload : ''));
          link.write(
            encode('size', '1024', '768', '96') + encode('audio', 'audio/L8', 'audio/L16') +
              encode('video') + encode('image', 'image/jpeg', 'image/png', 'image/webp') +
              encode('timezone', 'UTC') + encode('name', 'bench') +
              encode('connect', 'VERSION_1_5_0', ...values),
          );
          phase = 'ready';
          continue;
        }
        if (parts[0] !== 'ready') return reject(new Error(`guacd sent ${parts[0]}`));
        const rest = instructions.slice(k + 1).map((p) => encode(...p)).join('') + parser.pending;
        keep(link, extra, Buffer.from(rest, 'latin1'));
        return resolve();
      }
      return undefined;
    });
    link.write(encode('select', 'vnc'));
  });
}

/** The RFB client handshake (with consoleproxy, or the VNC server itself). */
function rfbReady(link, extra) {
  return new Promise((resolve, reject) => {
    link.onclose = (why) => reject(new Error(`${why} before ServerInit`));
    let buffer = Buffer.alloc(0);
    let phase = 'version';
    listen(link, (buf) => {
      buffer = Buffer.concat([buffer, buf]);
      for (;;) {
        if (phase === 'version' && buffer.length >= 12) {
          buffer = buffer.subarray(12);
          link.write(Buffer.from('RFB 003.008\n'));
          phase = 'types';
        } else if (phase === 'types' && buffer.length >= 1 && buffer.length >= 1 + buffer[0]) {
          buffer = buffer.subarray(1 + buffer[0]);
          link.write(Buffer.from([1]));
          phase = 'result';
        } else if (phase === 'result' && buffer.length >= 4) {
          buffer = buffer.subarray(4);
          link.write(Buffer.from([1])); // ClientInit, shared
          phase = 'init';
        } else if (phase === 'init' && buffer.length >= 24 && buffer.length >= 24 + buffer.readUInt32BE(20)) {
          keep(link, extra, Buffer.from(buffer.subarray(24 + buffer.readUInt32BE(20))));
          return resolve();
        } else {
          return;
        }
      }
    });
  });
}

/**
 * Open one session on the target; resolves with {link, extra, tokenMs, readyMs, totalMs}:
 * extra holds what arrived after the session was ready, until L{attach}.
 */
async function openSession(workload) {
  const rfb = ['consoleproxy-rfb', 'websockify', 'rfb-direct'].includes(target.kind);
  const start = now();
  let link;
  let tokenDone;
  if (target.kind === 'direct') {
    tokenDone = now();
    link = await tcpLink(target.guacd);
  } else if (target.kind === 'rfb-direct') {
    tokenDone = now();
    link = await tcpLink(target.rfb);
  } else {
    const [url, protocol] = await sessionUrl(workload);
    tokenDone = now();
    link = await wsLink(url, protocol);
  }
  const extra = [];
  await (rfb ? rfbReady(link, extra) : guacReady(link, workload, extra));
  const done = now();
  return { link, extra, tokenMs: tokenDone - start, readyMs: done - tokenDone, totalMs: done - start };
}

/** Deliver a session's data to C{take} from now on, starting with what was kept. */
function attach(session, take) {
  session.link.ondata = take;
  for (const buf of session.extra.splice(0)) take(buf);
}

/** Open C{count} sessions, C{concurrency} at a time; failures are counted. */
async function openMany(count, concurrency, workload) {
  const sessions = [];
  const errors = {};
  let next = 0;
  const worker = async () => {
    while (next < count) {
      next += 1;
      try {
        sessions.push(await openSession(workload));
      } catch (e) {
        const key = String(e.message || e).slice(0, 80);
        errors[key] = (errors[key] || 0) + 1;
      }
    }
  };
  const start = now();
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  return { sessions, errors, elapsed: (now() - start) / 1000 };
}

// -- commands ------------------------------------------------------------------------

async function throughput() {
  const rfb = spec.command === 'rfb';
  const { sessions, errors } = await openMany(spec.sessions, spec.sessions, spec.workload);
  const check = { instructions: 0, error: null };
  let bytes = 0;
  let counting = false;
  let closedEarly = 0;
  for (const s of sessions) {
    const checker = rfb ? new RfbChecker(check) : new GuacChecker(check);
    const take = (buf) => {
      if (counting) bytes += buf.length;
      checker.feed(buf);
    };
    attach(s, take);
  }
  await sleep(spec.warmup * 1000);
  const cpu = process.cpuUsage();
  const start = now();
  counting = true;
  await sleep(spec.duration * 1000);
  counting = false;
  const elapsed = (now() - start) / 1000;
  const used = process.cpuUsage(cpu);
  for (const s of sessions) {
    if (s.link.closed) closedEarly += 1;
    s.link.close();
  }
  return {
    mbps: bytes / elapsed / 1e6,
    bytes,
    elapsed,
    sessions: sessions.length,
    errors,
    closed_early: closedEarly,
    check,
    loadgen_cpu: (used.user + used.system) / 1e6 / elapsed,
  };
}

async function latency() {
  const { sessions, errors } = await openMany(spec.sessions, Math.min(spec.sessions, 50), 'echo');
  const samples = [];
  let sequence = 0;
  let recording = false;
  let lost = 0;
  const payload = 'x'.repeat(24);
  const waiters = sessions.map((s) => {
    const parser = new GuacParser();
    const pending = [];
    attach(s, (buf) => {
      for (const parts of parser.feed(buf.toString('latin1'))) {
        if (parts[0] !== 'echo') continue;
        const sent = pending.shift();
        if (sent === undefined) continue;
        const rtt = now() - sent.at;
        if (sent.record) samples.push(rtt * 1000);
        if (sent.resolve) sent.resolve();
      }
    });
    return {
      send(record, resolve) {
        sequence += 1;
        pending.push({ at: now(), record, resolve });
        s.link.write(encode('echo', String(sequence), payload));
      },
      pending,
    };
  });
  const cpu = process.cpuUsage();
  const start = now();
  if (sessions.length === 1) {
    // One session: closed loop, one round trip at a time.
    const [w] = waiters;
    for (let n = 0; n < spec.warmup_trips + spec.round_trips; n += 1) {
      await new Promise((resolve) => w.send(n >= spec.warmup_trips, resolve));
    }
  } else {
    // Many sessions: each sends one round trip every interval, at its own phase.
    const end = now() + (spec.warmup + spec.duration) * 1000;
    setTimeout(() => {
      recording = true;
    }, spec.warmup * 1000);
    await Promise.all(
      waiters.map(async (w) => {
        await sleep(Math.random() * spec.interval);
        while (now() < end) {
          w.send(recording);
          await sleep(spec.interval);
        }
      }),
    );
    await sleep(1000);
    lost = waiters.reduce((n, w) => n + w.pending.length, 0);
  }
  const elapsed = (now() - start) / 1000;
  const used = process.cpuUsage(cpu);
  for (const s of sessions) s.link.close();
  samples.sort((a, b) => a - b);
  return {
    p50_us: percentile(samples, 0.5),
    p99_us: percentile(samples, 0.99),
    samples: samples.length,
    lost,
    sessions: sessions.length,
    errors,
    loadgen_cpu: (used.user + used.system) / 1e6 / elapsed,
  };
}

async function setup() {
  const result = await openMany(spec.count, spec.concurrency, 'idle');
  const { sessions } = result;
  for (const s of sessions) s.link.close();
  return {
    rate: sessions.length / result.elapsed,
    opened: sessions.length,
    errors: result.errors,
    elapsed: result.elapsed,
    token_ms: median(sessions.map((s) => s.tokenMs)),
    ready_ms: median(sessions.map((s) => s.readyMs)),
    total_ms: median(sessions.map((s) => s.totalMs)),
  };
}

async function hold() {
  const result = await openMany(spec.count, spec.concurrency, 'idle');
  const { sessions } = result;
  for (const s of sessions) attach(s, () => {});
  // The browser's keep-alive: a nop from every session every 5 s (guacamole-lite drops a
  // browser silent for 10 s), spread over the 5 s.
  let turn = 0;
  const timer = setInterval(() => {
    for (let i = turn; i < sessions.length; i += 5) sessions[i].link.write(NOP);
    turn = (turn + 1) % 5;
  }, 1000);
  const alive = () => sessions.filter((s) => !s.link.closed).length;
  console.log(JSON.stringify({
    opened: sessions.length, errors: result.errors, elapsed: result.elapsed,
    rate: sessions.length / result.elapsed,
  }));
  let input = '';
  process.stdin.on('data', (chunk) => {
    input += chunk.toString();
    let newline;
    while ((newline = input.indexOf('\n')) >= 0) {
      input = input.slice(newline + 1);
      console.log(JSON.stringify({ alive: alive() }));
    }
  });
  await new Promise((resolve) => process.stdin.on('end', resolve));
  clearInterval(timer);
  for (const s of sessions) s.link.close();
  return null;
}

const commands = { throughput, rfb: throughput, latency, setup, hold };

commands[spec.command]()
  .then((result) => {
    if (result !== null) console.log(JSON.stringify(result));
    process.exit(0);
  })
  .catch((e) => {
    console.log(JSON.stringify({ fatal: String((e && e.stack) || e) }));
    process.exit(1);
  });
