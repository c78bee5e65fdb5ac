// consoleproxy console page: one console of one VM, through Guacamole
// (guacamole-common-js over /guacamole) or raw VNC (noVNC over /rfb).
//
// 1. GET <base>/api/console-modes: {"guacamole": guacd reachable, "rfb": raw VNC enabled}
// 2. GET <base>/console/<id>/<type>/token[?mode=rfb] (the token API under the page's
//    own URL, so the browser sends the page's HTTP Basic credentials at once): a token
// 3. the WebSocket with that token; every failure is shown in words.
//
// The page's URL may say ?mode=rfb (noVNC) or ?mode=guacamole; otherwise a VNC
// console uses Guacamole when guacd is reachable and noVNC when it is not.

const body = document.body;
const config = {
  base: body.dataset.base || "",
  vm: body.dataset.vm,
  type: body.dataset.type,
  guacamoleJs: body.dataset.guacamoleJs,
  novncJs: body.dataset.novncJs,
  missing: body.dataset.missing,
};
const requestedMode = new URLSearchParams(window.location.search).get("mode");
document.getElementById("title").title = `Signed in as ${body.dataset.user}`;

const elements = {
  state: document.getElementById("state"),
  error: document.getElementById("error"),
  screen: document.getElementById("screen"),
  cad: document.getElementById("cad"),
  fullscreen: document.getElementById("fullscreen"),
  reconnect: document.getElementById("reconnect"),
  clipboardToggle: document.getElementById("clipboard-toggle"),
  clipboardPanel: document.getElementById("clipboard-panel"),
  clipboard: document.getElementById("clipboard"),
  clipboardSend: document.getElementById("clipboard-send"),
};

// Guacamole status codes (the close reason of both relays) in words.
const STATUS_TEXT = {
  0x0000: "The console session ended.",
  0x0100: "The remote console does not support this operation.",
  0x0200: "The console server had an internal error.",
  0x0201: "The console server is too busy to open another console. Try again later.",
  0x0202: "The remote console took too long to answer.",
  0x0203: "The remote console reported an error or refused the connection.",
  0x0204: "This console does not exist (any more).",
  0x0205: "This console is in use and cannot be shared.",
  0x0206: "The console was closed.",
  0x0207: "The remote console cannot be reached: is the VM running?",
  0x0208: "The remote console is not accepting connections.",
  0x0209: "The session was taken over by another connection.",
  0x020a: "The session timed out.",
  0x020b: "The session was closed by the server.",
  0x0300: "The console server did not understand the browser's request.",
  0x0301:
    "The console token was refused: it expired or was already used. " +
    "Press Reconnect to get a new one.",
  0x0303: "You are not allowed to open this console.",
  0x0308: "The connection timed out: the browser sent or read nothing for too long.",
  0x030d: "The browser sent more data at once than the console server accepts.",
  0x030f: "The browser sent data of a kind the console server does not accept.",
  0x031d: "Too many consoles are open. Close one and try again.",
};

// Statuses whose meaning depends on whether the Guacamole tunnel had opened:
// before it opened, the relay could not reach its own guacd (the console
// service), not the VM.
const STATUS_TEXT_BEFORE_OPEN = {
  0x0207:
    "The console server cannot reach its console service (guacd). " +
    "Try again later; if it persists, tell the operator.",
};

// Words the relay may put after the status in a close reason ("523 ended by an
// administrator": a kill through the sessions API), in the page's words.
const CLOSE_WORDS = {
  "ended by an administrator": "The session was ended by an administrator.",
};

/**
 * A Guacamole status code (and optional message) in words; `beforeOpen`: the
 * Guacamole tunnel closed before its first instruction.
 */
function statusText(code, message, beforeOpen = false) {
  const rest = typeof message === "string" ? message.replace(/^\d+ /, "") : "";
  if (Object.hasOwn(CLOSE_WORDS, rest)) return `${CLOSE_WORDS[rest]} (status ${code})`;
  const known = (beforeOpen && STATUS_TEXT_BEFORE_OPEN[code]) || STATUS_TEXT[code];
  if (known) return `${known} (status ${code})`;
  if (code >= 0x0200 && code < 0x0300) return `The console server reported an error (status ${code}).`;
  if (code >= 0x0300) return `The console server refused the connection (status ${code}).`;
  return message ? `The connection failed: ${message}` : "The connection failed.";
}

let session = null; // {close, sendCtrlAltDel, sendClipboard, fit}
let attempt = 0;
let lastRemoteClipboard = "";

function setState(state, text) {
  body.dataset.state = state;
  elements.state.textContent = text;
}

function showError(text) {
  if (!elements.error.hidden) return; // the first error says the most
  elements.error.textContent = text;
  elements.error.hidden = false;
  elements.cad.disabled = true;
  setState("error", "Not connected");
}

function clearError() {
  elements.error.hidden = true;
  elements.error.textContent = "";
}

/** GET a JSON answer of the API (FireEdge's shape), with the page's credentials. */
async function api(path) {
  let response;
  try {
    // From the origin: a page opened as http://user:password@host/... has a base URL that
    // fetch refuses; the browser adds the credentials it holds for this realm by itself.
    response = await fetch(new URL(config.base + path, window.location.origin), {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    });
  } catch (error) {
    throw new Error(`The console server cannot be reached (${error.message}).`);
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    answer = null;
  }
  if (!response.ok) {
    const detail = answer && typeof answer.data === "string" ? answer.data : response.statusText;
    throw new Error(describeApiError(response.status, detail, response.headers.get("Retry-After")));
  }
  return answer;
}

function describeApiError(status, detail, retryAfter) {
  const why = detail ? `: ${detail}` : ".";
  if (status === 503 && retryAfter) {
    // Busy (password checks queued, failed-login budget spent) or shutting down: say when.
    const when = /^\d+$/.test(retryAfter) ? `in ${retryAfter} s` : "in a moment";
    const reason = detail ? `: ${detail}.` : ".";
    return `The console server cannot take this request now${reason} Press Reconnect ${when}.`;
  }
  switch (status) {
    case 400:
      return `This console cannot be opened${why}`;
    case 401:
      return `Your user name or password was not accepted${why} Reload the page to sign in again.`;
    case 403:
      return `You are not allowed to open this console${why}`;
    case 404:
      return `No such VM or console${why}`;
    case 409:
      return `The VM is not in a state where its console works${why}`;
    case 429:
      return `Too many requests; wait a moment and press Reconnect${why}`;
    case 502:
    case 503:
    case 504:
      return `The cloud did not answer properly (HTTP ${status})${why}`;
    default:
      return `The console token could not be obtained (HTTP ${status})${why}`;
  }
}

function webSocketUrl(path) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}${config.base}${path}`;
}

/** Guacamole or rfb, from the page's URL and what the server can do now. */
function chooseMode(modes) {
  if (requestedMode === "rfb") {
    if (config.type !== "vnc") return { error: "Raw VNC (mode=rfb) is for VNC consoles only." };
    if (!modes.rfb) return { error: "Raw VNC (mode=rfb) is not enabled on this server." };
    return { mode: "rfb" };
  }
  if (requestedMode === "guacamole" || modes.guacamole) return { mode: "guacamole" };
  if (config.type === "vnc" && modes.rfb) return { mode: "rfb" };
  return {
    error:
      "guacd, which this console needs, is not reachable from the console server" +
      (config.type === "vnc" ? " and raw VNC is not enabled." : "; only VNC consoles work without it."),
  };
}

async function start() {
  attempt += 1;
  const mine = attempt;
  stop();
  clearError();
  elements.cad.disabled = true;
  if (config.missing) {
    showError(
      `The console's JavaScript libraries are not installed on the server (${config.missing}). ` +
        "An administrator runs scripts/setup (npm ci) there.",
    );
    return;
  }
  setState("modes", "Checking which console relays are available…");
  let modes = { guacamole: true, rfb: false };
  try {
    modes = (await api("/api/console-modes")).data;
  } catch (error) {
    // Not fatal: try Guacamole and let its connection say what is wrong.
    console.warn("console modes:", error);
  }
  if (mine !== attempt) return;
  const chosen = chooseMode(modes);
  if (chosen.error) {
    showError(chosen.error);
    return;
  }
  body.dataset.mode = chosen.mode;
  setState("token", "Asking for a console token…");
  const query = chosen.mode === "rfb" ? "?mode=rfb" : "";
  let token;
  try {
    // Under the page's own URL: the browser sends the credentials it holds for the page
    // with the first request (RFC 7617, 2.2); /api/vm/... would draw a 401 challenge first.
    const vm = encodeURIComponent(config.vm);
    token = (await api(`/console/${vm}/${config.type}/token${query}`)).data;
  } catch (error) {
    if (mine === attempt) showError(error.message);
    return;
  }
  if (mine !== attempt) return;
  try {
    if (chosen.mode === "rfb") await startNoVnc(token);
    else await startGuacamole(token);
  } catch (error) {
    console.error(error);
    showError(`The console could not start: ${error.message}`);
  }
}

function stop() {
  if (session) {
    const old = session;
    session = null;
    try {
      old.close();
    } catch (error) {
      console.warn("closing the old session:", error);
    }
  }
  elements.screen.replaceChildren();
}

/** The size (CSS pixels) the remote screen may take. */
function screenSize() {
  return {
    width: Math.max(1, elements.screen.clientWidth),
    height: Math.max(1, elements.screen.clientHeight),
  };
}

// -- Guacamole ---------------------------------------------------------------------

async function startGuacamole(token) {
  setState("connecting", "Loading guacamole-common-js…");
  const { default: Guacamole } = await import(config.guacamoleJs);
  setState("connecting", "Connecting through Guacamole…");
  const tunnel = new Guacamole.WebSocketTunnel(webSocketUrl("/guacamole"));
  const client = new Guacamole.Client(tunnel);
  const display = client.getDisplay();
  const view = display.getElement();
  elements.screen.replaceChildren(view);
  let closed = false;

  const fit = () => {
    const width = display.getWidth();
    const height = display.getHeight();
    if (!width || !height) return;
    const { width: w, height: h } = screenSize();
    display.scale(Math.min(w / width, h / height));
  };
  display.onresize = fit;

  const failed = (status) => {
    // The relay sends the tunnel's UUID first: without one, it never opened.
    if (!closed) showError(statusText(status.code, status.message, !tunnel.uuid));
  };
  tunnel.onerror = failed;
  client.onerror = failed;
  client.onstatechange = (state) => {
    switch (state) {
      case 1:
        setState("connecting", "Connecting through Guacamole…");
        break;
      case 2:
        setState("waiting", "Waiting for the remote console…");
        break;
      case 3:
        elements.cad.disabled = false;
        setState("connected", "Connected (Guacamole)");
        elements.screen.focus();
        fit();
        break;
      case 4:
        break;
      case 5:
        elements.cad.disabled = true;
        if (body.dataset.state !== "error") setState("disconnected", "Disconnected. Press Reconnect to connect again.");
        break;
      default:
        break;
    }
  };

  client.onclipboard = (stream, mimetype) => {
    if (!/^text\//.test(mimetype)) return;
    const reader = new Guacamole.StringReader(stream);
    let text = "";
    reader.ontext = (part) => {
      text += part;
    };
    reader.onend = () => remoteClipboard(text);
  };

  const mouse = new Guacamole.Mouse(view);
  mouse.onEach(["mousedown", "mouseup", "mousemove"], (event) => {
    elements.screen.focus();
    client.sendMouseState(event.state, true);
  });
  const touch = new Guacamole.Mouse.Touchscreen(view);
  touch.onEach(["mousedown", "mouseup", "mousemove"], (event) => {
    client.sendMouseState(event.state, true);
  });
  display.oncursor = (canvas, x, y) => display.showCursor(!mouse.setCursor(canvas, x, y));

  const keyboard = new Guacamole.Keyboard(elements.screen);
  keyboard.onkeydown = (keysym) => {
    client.sendKeyEvent(1, keysym);
    return false;
  };
  keyboard.onkeyup = (keysym) => client.sendKeyEvent(0, keysym);

  let resizeTimer = null;
  const resized = () => {
    fit();
    window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(() => {
      const ratio = window.devicePixelRatio || 1;
      const { width, height } = screenSize();
      client.sendSize(Math.round(width * ratio), Math.round(height * ratio));
    }, 250);
  };

  session = {
    fit: resized,
    sendCtrlAltDel() {
      const keys = [0xffe3, 0xffe9, 0xffff]; // Control_L, Alt_L, Delete
      for (const key of keys) client.sendKeyEvent(1, key);
      for (const key of keys.reverse()) client.sendKeyEvent(0, key);
    },
    sendClipboard(text) {
      const writer = new Guacamole.StringWriter(client.createClipboardStream("text/plain"));
      writer.sendText(text);
      writer.sendEnd();
    },
    close() {
      closed = true;
      window.clearTimeout(resizeTimer);
      keyboard.reset();
      keyboard.onkeydown = keyboard.onkeyup = null;
      client.disconnect();
    },
  };

  const ratio = window.devicePixelRatio || 1;
  const { width, height } = screenSize();
  const parameters = new URLSearchParams({
    token,
    width: String(Math.round(width * ratio)),
    height: String(Math.round(height * ratio)),
    dpi: String(Math.round(96 * ratio)),
  });
  client.connect(parameters.toString());
}

// -- noVNC ---------------------------------------------------------------------------

async function startNoVnc(token) {
  setState("connecting", "Loading noVNC…");
  const { default: RFB } = await import(config.novncJs);
  setState("connecting", "Connecting through raw VNC (noVNC)…");
  const url = `${webSocketUrl("/rfb")}?token=${encodeURIComponent(token)}`;
  // The page owns the socket so that it can read the close code and reason.
  const socket = new WebSocket(url, ["binary"]);
  socket.binaryType = "arraybuffer";
  let closeEvent = null;
  let closed = false;
  socket.addEventListener("close", (event) => {
    closeEvent = event;
  });
  const rfb = new RFB(elements.screen, socket, { shared: true });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.focusOnClick = true;
  rfb.addEventListener("connect", () => {
    elements.cad.disabled = false;
    setState("connected", "Connected (noVNC)");
    rfb.focus();
  });
  rfb.addEventListener("disconnect", (event) => {
    elements.cad.disabled = true;
    if (closed) return;
    const reason = closeEvent ? Number.parseInt(closeEvent.reason, 10) : Number.NaN;
    if (!Number.isNaN(reason) && reason !== 0) {
      showError(statusText(reason, closeEvent.reason));
    } else if (!event.detail.clean) {
      showError("The connection to the console server was lost or refused.");
    } else if (body.dataset.state !== "error") {
      setState("disconnected", "Disconnected. Press Reconnect to connect again.");
    }
  });
  rfb.addEventListener("securityfailure", (event) => {
    showError(`The VNC server refused the connection: ${event.detail.reason || "no reason given"}.`);
  });
  rfb.addEventListener("credentialsrequired", () => {
    showError("The VNC server asks for credentials, which the console server should have supplied.");
    rfb.disconnect();
  });
  rfb.addEventListener("clipboard", (event) => remoteClipboard(event.detail.text));
  session = {
    fit() {},
    sendCtrlAltDel: () => rfb.sendCtrlAltDel(),
    sendClipboard: (text) => rfb.clipboardPasteFrom(text),
    close() {
      closed = true;
      rfb.disconnect();
    },
  };
}

// -- clipboard, buttons, window ------------------------------------------------------

/** The remote copied text: show it, and put it on the local clipboard when allowed. */
function remoteClipboard(text) {
  lastRemoteClipboard = text;
  elements.clipboard.value = text;
  if (navigator.clipboard && document.hasFocus()) {
    navigator.clipboard.writeText(text).catch(() => {});
  }
}

function sendClipboard(text) {
  if (session && body.dataset.state === "connected" && text !== lastRemoteClipboard) {
    session.sendClipboard(text);
    lastRemoteClipboard = text;
  }
}

elements.clipboardToggle.addEventListener("click", () => {
  const open = elements.clipboardPanel.hidden;
  elements.clipboardPanel.hidden = !open;
  elements.clipboardToggle.setAttribute("aria-expanded", String(open));
  if (session) session.fit();
});
elements.clipboardSend.addEventListener("click", () => {
  sendClipboard(elements.clipboard.value);
  elements.screen.focus();
});
// Pasting while the screen has the focus sends the text to the remote.
elements.screen.addEventListener("paste", (event) => {
  const text = event.clipboardData ? event.clipboardData.getData("text/plain") : "";
  if (text) {
    elements.clipboard.value = text;
    sendClipboard(text);
  }
  event.preventDefault();
});
// Coming back to the page: offer the local clipboard if the browser allows reading it.
window.addEventListener("focus", async () => {
  if (!navigator.clipboard || !navigator.permissions) return;
  try {
    const permission = await navigator.permissions.query({ name: "clipboard-read" });
    if (permission.state !== "granted") return;
    const text = await navigator.clipboard.readText();
    if (text) {
      elements.clipboard.value = text;
      sendClipboard(text);
    }
  } catch {
    // Not allowed here: the clipboard panel still works.
  }
});

elements.cad.addEventListener("click", () => {
  if (session) session.sendCtrlAltDel();
  elements.screen.focus();
});
elements.fullscreen.addEventListener("click", () => {
  if (document.fullscreenElement) {
    document.exitFullscreen().catch(() => {});
  } else if (document.documentElement.requestFullscreen) {
    document.documentElement.requestFullscreen().catch((error) => {
      console.warn("fullscreen refused:", error);
    });
  }
});
document.addEventListener("fullscreenchange", () => {
  elements.fullscreen.textContent = document.fullscreenElement ? "Leave fullscreen" : "Fullscreen";
  if (session) session.fit();
});
elements.reconnect.addEventListener("click", () => {
  start();
});
window.addEventListener("resize", () => {
  if (session) session.fit();
});

// Nothing may leave a blank page: unexpected failures are shown in words too.
window.addEventListener("error", (event) => {
  showError(`The console page failed: ${event.message}`);
});
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason && event.reason.message ? event.reason.message : String(event.reason);
  showError(`The console page failed: ${reason}`);
});

start();
