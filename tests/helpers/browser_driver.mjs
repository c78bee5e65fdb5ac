// Drives headless Chromium (Debian's /usr/bin/chromium) with playwright-core for
// tests/helpers/browser.py.  One JSON command per line on stdin, one JSON answer per line on
// stdout: {"id": n, "ok": true, "value": ...} or {"id": n, "ok": false, "error": "..."}.
// The browser starts before the first answer ({"id": 0, "ok": true, "value": "ready"})
// and stops when stdin ends or on {"op": "close"}.  Playwright gives the browser a
// fresh, empty profile directory (--user-data-dir) of its own and removes it after.

import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const args = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--force-device-scale-factor=1",
  // More from the test (a JSON list), e.g. the TLS key a test server may present.
  ...JSON.parse(process.env.CHROMIUM_EXTRA_ARGS || "[]"),
];

function answer(message) {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

let context = null;
let page = null;
const consoleLines = [];

const operations = {
  async open({ url, user, password, width = 800, height = 600 }) {
    if (context) await context.close();
    const options = { viewport: { width, height }, deviceScaleFactor: 1 };
    if (user !== undefined) options.httpCredentials = { username: user, password };
    context = await browser.newContext(options);
    page = await context.newPage();
    page.on("console", (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => consoleLines.push(`pageerror: ${error.message}`));
    const response = await page.goto(url);
    return { status: response ? response.status() : null };
  },
  async wait_state({ states, timeout = 15000 }) {
    await page.waitForFunction(
      (wanted) => wanted.includes(document.body && document.body.dataset.state),
      states,
      { timeout, polling: 50 },
    );
    return page.evaluate(() => ({
      state: document.body.dataset.state,
      mode: document.body.dataset.mode || null,
      status: (document.getElementById("state") || {}).textContent || "",
      error: (document.getElementById("error") || {}).textContent || "",
      text: document.body.innerText,
    }));
  },
  async screenshot({ path }) {
    await page.screenshot({ path });
    return path;
  },
  async click({ selector }) {
    await page.click(selector);
    return null;
  },
  async click_at({ x, y }) {
    await page.mouse.click(x, y);
    return null;
  },
  async press({ key }) {
    await page.keyboard.press(key);
    return null;
  },
  async text({ selector }) {
    return page.innerText(selector);
  },
  async evaluate({ expression }) {
    return page.evaluate(expression);
  },
  async console() {
    return consoleLines.slice();
  },
};

const browser = await chromium.launch({
  executablePath,
  args,
  headless: true,
});
answer({ id: 0, ok: true, value: "ready" });

async function shutdown() {
  try {
    await browser.close();
  } finally {
    process.exit(0);
  }
}

const lines = createInterface({ input: process.stdin });
let queue = Promise.resolve();
lines.on("line", (line) => {
  queue = queue.then(async () => {
    let command;
    try {
      command = JSON.parse(line);
    } catch (error) {
      answer({ id: null, ok: false, error: `bad command: ${error.message}` });
      return;
    }
    if (command.op === "close") {
      answer({ id: command.id, ok: true, value: null });
      await shutdown();
      return;
    }
    const operation = operations[command.op];
    if (!operation) {
      answer({ id: command.id, ok: false, error: `unknown op ${command.op}` });
      return;
    }
    try {
      answer({ id: command.id, ok: true, value: await operation(command) });
    } catch (error) {
      answer({ id: command.id, ok: false, error: String(error && error.message ? error.message : error) });
    }
  });
});
lines.on("close", () => {
  queue.then(shutdown);
});
