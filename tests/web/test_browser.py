"""The console page in a real browser: headless Chromium driven by Playwright.

- Guacamole path: the fake guacd draws two known colours; the screenshot shows them; keys,
  mouse and the clipboard (both ways) reach guacd or come from it.
- noVNC path: a real x11vnc on Xvfb shows a two-colour pattern; the screenshot shows it;
  a key typed into the page reaches the X display (seen by xev on the X side).
- Errors in words: wrong credentials, an expired token (both paths), an unknown VM, guacd
  unreachable (519, not an internal error), the VM unreachable behind guacd (guacd 1.6's
  bare ``disconnect``: 519, not "Disconnected").

Skipped, naming the missing package, without node, chromium or the npm packages
(scripts/setup installs them all).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers.browser import Browser, pixel, read_png, require_browser
from tests.helpers.consoleserver import start_console_server
from tests.helpers.fakeguacd import Behaviour, FakeGuacd
from tests.helpers.support import wait

RED = (220, 30, 40)
BLUE = (30, 60, 200)
ORANGE = (255, 128, 0)
SKY = (0, 128, 255)
WIDTH, HEIGHT = 800, 600
#: Colours may differ a little after scaling and lossy encodings.
TOLERANCE = 12


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def close_to(actual: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    """Whether two colours match within L{TOLERANCE} per channel."""
    return all(abs(a - e) <= TOLERANCE for a, e in zip(actual, expected, strict=True))


class BrowserTestCase(TestCase):
    """Starts the browser; helpers for screenshots of the remote screen."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        require_browser()
        self.browser = yield Browser.start(self)

    @inlineCallbacks
    def open_console(
        self, url: str, user: str = "alice", password: str = "wonderland", in_url: bool = False
    ):  # type: ignore[no-untyped-def]
        """
        Open the page; return the driver's answer (with the HTTP status).

        The credentials answer the browser's Basic challenges (as a person typing them
        into the browser's prompt), or with C{in_url} go in the URL (``http://u:p@host/``):
        then only the browser's own credential cache gives them to the page's requests.
        """
        if in_url:
            url = url.replace("http://", f"http://{user}:{password}@", 1)
            result = yield self.browser.command("open", url=url, width=WIDTH, height=HEIGHT)
        else:
            result = yield self.browser.command(
                "open", url=url, user=user, password=password, width=WIDTH, height=HEIGHT
            )
        return result

    @inlineCallbacks
    def wait_state(self, *states: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
        """Wait until the page's state is one of C{states}; return what it shows."""
        shown = yield self.browser.command(
            "wait_state", states=list(states), timeout=int(timeout * 1000)
        )
        return shown

    @inlineCallbacks
    def screen_colours(self, selector: str):  # type: ignore[no-untyped-def]
        """
        Screenshot the page; return the colours at the middle of the top and bottom
        quarters of the element C{selector} (the remote screen as displayed).
        """
        box = yield self.browser.command(
            "evaluate",
            expression=(
                f"(() => {{ const r = document.querySelector({selector!r})"
                ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
            ),
        )
        x, y, width, height = box
        self.assertGreater(width, 100, "the remote screen is not displayed")
        path = os.path.abspath(self.mktemp() + ".png")
        yield self.browser.command("screenshot", path=path)
        image_width, image_height, rows = read_png(path)
        self.assertEqual((image_width, image_height), (WIDTH, HEIGHT))
        middle = int(x + width / 2)
        top = pixel(rows, middle, int(y + height / 4))
        bottom = pixel(rows, middle, int(y + 3 * height / 4))
        return top, bottom, path

    @inlineCallbacks
    def wait_for(self, check: Any, what: str, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        """Poll C{check()} until true."""
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            yield wait(0.05)


class GuacamolePathTests(BrowserTestCase):
    """guacamole-common-js against the fake guacd, through the relay."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        self.guacd = FakeGuacd(reactor)
        yield self.guacd.start()
        self.addCleanup(self.guacd.stop)
        self.server = yield start_console_server(self, guacd=f"tcp:127.0.0.1:{self.guacd.port}")

    @inlineCallbacks
    def test_known_image_keys_mouse_clipboard(self):  # type: ignore[no-untyped-def]
        opened = yield self.open_console(self.server.url("/console/7/vnc"))
        self.assertEqual(opened["status"], 200)
        # Connection 1 is /api/console-modes asking whether guacd is reachable.
        conn = yield self.guacd.wait_for_connection(2)
        self.assertEqual(conn.select, "vnc")
        self.assertEqual(conn.connect["hostname"], "127.0.0.1")
        self.assertEqual(conn.connect["password"], "vncpw")
        # The browser asked for the size of its screen area (below the toolbar).
        self.assertEqual(conn.size[0], str(WIDTH))
        # Draw: a 400x300 screen, red above, blue below, then a frame.
        conn.send("size", "0", "400", "300")
        for top, (r, g, b) in ((0, RED), (150, BLUE)):
            conn.send("rect", "0", "0", str(top), "400", "150")
            conn.send("cfill", "14", "0", str(r), str(g), str(b), "255")
        conn.send_sync(1)
        shown = yield self.wait_state("connected", "error")
        self.assertEqual((shown["state"], shown["mode"]), ("connected", "guacamole"), shown)
        self.assertIn("Connected", shown["status"])
        yield wait(0.3)
        top, bottom, path = yield self.screen_colours("#screen > div")
        self.assertTrue(close_to(top, RED), f"top {top} is not red; see {path}")
        self.assertTrue(close_to(bottom, BLUE), f"bottom {bottom} is not blue; see {path}")

        # Keyboard and mouse reach guacd.
        yield self.browser.command("click", selector="#screen > div")
        yield self.browser.command("press", key="a")
        yield self.wait_for(lambda: ["key", "97", "1"] in conn.received, "key a pressed")
        yield self.wait_for(lambda: ["key", "97", "0"] in conn.received, "key a released")
        mice = [i for i in conn.received if i[0] == "mouse"]
        self.assertTrue(any(i[3] == "1" for i in mice), mice)  # left button down
        # Ctrl-Alt-Del: Control_L, Alt_L, Delete down, then up.
        before = len(conn.received)
        yield self.browser.command("click", selector="#cad")
        yield self.wait_for(lambda: len(conn.received) >= before + 6, "Ctrl-Alt-Del")
        keys = [i[1:] for i in conn.received[before:] if i[0] == "key"]
        down = [["65507", "1"], ["65513", "1"], ["65535", "1"]]
        up = [["65535", "0"], ["65513", "0"], ["65507", "0"]]
        self.assertEqual(keys[:6], [*down, *up])

        # Clipboard, remote to local: guacd's clipboard stream appears in the panel.
        conn.send("clipboard", "5", "text/plain")
        conn.send("blob", "5", base64.b64encode("from the VM ✓".encode()).decode())
        conn.send("end", "5")
        yield self.wait_for_value("#clipboard", "from the VM ✓")
        # Clipboard, local to remote: typed in the panel, sent with the button.
        yield self.browser.command("click", selector="#clipboard-toggle")
        yield self.browser.command(
            "evaluate", expression="document.getElementById('clipboard').value = 'to the VM'"
        )
        yield self.browser.command("click", selector="#clipboard-send")
        yield self.wait_for(
            lambda: any(i[0] == "clipboard" and i[2] == "text/plain" for i in conn.received),
            "a clipboard stream",
        )
        yield self.wait_for(lambda: any(i[0] == "end" for i in conn.received), "its end")
        blobs = [i[2] for i in conn.received if i[0] == "blob"]
        self.assertEqual(base64.b64decode("".join(blobs)).decode(), "to the VM")

    @inlineCallbacks
    def wait_for_value(self, selector: str, expected: str):  # type: ignore[no-untyped-def]
        """Wait until the form field C{selector} holds C{expected}."""
        deadline = reactor.seconds() + 5
        while True:
            value = yield self.browser.command(
                "evaluate", expression=f"document.querySelector({selector!r}).value"
            )
            if value == expected:
                return
            if reactor.seconds() > deadline:
                self.fail(f"{selector} holds {value!r}, not {expected!r}")
            yield wait(0.05)

    @inlineCallbacks
    def test_guacd_error_in_words(self):  # type: ignore[no-untyped-def]
        yield self.open_console(self.server.url("/fireedge/console/7/vnc"))
        conn = yield self.guacd.wait_for_connection(2)
        conn.send_error("Unable to connect to VNC server.", 0x0207)
        shown = yield self.wait_state("error")
        self.assertIn("cannot be reached", shown["error"])
        self.assertIn("519", shown["error"])

    @inlineCallbacks
    def test_vm_unreachable_bare_disconnect_in_words(self):  # type: ignore[no-untyped-def]
        """guacd 1.6 ends with just 'disconnect' when the VM is unreachable: not 'Disconnected'."""
        self.guacd.behaviour = Behaviour(upstream=True, unreachable_disconnect=True)
        yield self.open_console(self.server.url("/console/7/vnc"))
        conn = yield self.guacd.wait_for_connection(2)
        shown = yield self.wait_state("error")
        self.assertEqual(conn.upstream_banner, None)  # the VM's console was never reached
        self.assertIn("The remote console cannot be reached: is the VM running?", shown["error"])
        self.assertIn("519", shown["error"])


class ErrorTests(BrowserTestCase):
    """Failures show as words, never as a blank page."""

    @inlineCallbacks
    def test_wrong_credentials(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self)
        opened = yield self.open_console(server.url("/console/7/vnc"), password="wrong")
        self.assertEqual(opened["status"], 401)
        shown = yield self.wait_state("error")
        self.assertIn("user name and password", shown["text"])

    @inlineCallbacks
    def test_expired_token_guacamole(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self, lifetime=0.001)
        yield self.open_console(server.url("/console/7/vnc?mode=guacamole"))
        shown = yield self.wait_state("error")
        self.assertEqual(shown["mode"], "guacamole")
        self.assertIn("token was refused", shown["error"])
        self.assertIn("expired", shown["error"])
        self.assertEqual(server.relay.token_refusals, {"expired": 1})

    @inlineCallbacks
    def test_expired_token_novnc(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self, lifetime=0.001)
        yield self.open_console(server.url("/console/7/vnc?mode=rfb"))
        shown = yield self.wait_state("error")
        self.assertEqual(shown["mode"], "rfb")
        self.assertIn("token was refused", shown["error"])
        self.assertEqual(server.rfb.token_refusals, {"expired": 1})

    @inlineCallbacks
    def test_guacd_unreachable_in_words(self):  # type: ignore[no-untyped-def]
        """Nothing listens where guacd should be: a connection failure, not an internal error."""
        server = yield start_console_server(self)  # guacd at 127.0.0.1:1
        yield self.open_console(server.url("/console/7/vnc?mode=guacamole"))
        shown = yield self.wait_state("error")
        self.assertEqual(shown["mode"], "guacamole")
        self.assertIn("cannot reach its console service (guacd)", shown["error"])
        self.assertIn("519", shown["error"])
        self.assertNotIn("internal error", shown["error"])

    @inlineCallbacks
    def test_unknown_vm_and_no_guacd_for_ssh(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self, guacd=None)
        yield self.open_console(server.url("/console/99/vnc"))
        shown = yield self.wait_state("error")
        self.assertIn("No such VM or console", shown["error"])
        yield self.open_console(server.url("/console/7/ssh"))
        shown = yield self.wait_state("error")
        self.assertIn("guacd", shown["error"])
        self.assertIn("only VNC consoles work without it", shown["error"])


class NoVncPathTests(BrowserTestCase):
    """noVNC against a real x11vnc on Xvfb, through the raw VNC relay (no guacd at all)."""

    timeout = 90

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        try:
            from tests.helpers.realservers import start_vnc_desktop  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover - the fixture module is part of tests/
            raise SkipTest(f"tests.helpers.realservers is not available: {e}") from e
        self.desktop = yield start_vnc_desktop(
            self, reactor, width=320, height=240, password="vnc-pass", colour=ORANGE
        )
        self.addCleanup(self.desktop.stop)
        yield self.paint_halves()
        self.server = yield start_console_server(
            self, guacd=None, vnc_port=self.desktop.port, vnc_password="vnc-pass"
        )

    @inlineCallbacks
    def paint_halves(self):  # type: ignore[no-untyped-def]
        """Tile the root window: ORANGE above, SKY below (an X bitmap of the screen's size)."""
        values = ["0xff"] * (40 * 120) + ["0x00"] * (40 * 120)
        lines = [", ".join(values[i : i + 12]) for i in range(0, len(values), 12)]
        bitmap = os.path.join(self.desktop.directory, "halves.xbm")
        with open(bitmap, "w") as f:
            f.write("#define halves_width 320\n#define halves_height 240\n")
            f.write("static unsigned char halves_bits[] = {\n")
            f.write(",\n".join(lines) + "};\n")
        _, err, code = yield getProcessOutputAndValue(
            "/usr/bin/xsetroot",
            ["-bitmap", bitmap, "-fg", _hex(ORANGE), "-bg", _hex(SKY)],
            env={"DISPLAY": self.desktop.display, "PATH": "/usr/bin:/bin"},
        )
        self.assertEqual(code, 0, err)
        # Checked from the X side first.
        self.assertEqual((yield self.desktop.screenshot_rgb(160, 60)), ORANGE)
        self.assertEqual((yield self.desktop.screenshot_rgb(160, 180)), SKY)

    @inlineCallbacks
    def test_pattern_and_keys(self):  # type: ignore[no-untyped-def]
        yield self.open_console(self.server.url("/console/7/vnc"), in_url=True)
        shown = yield self.wait_state("connected", "error")
        self.assertEqual((shown["state"], shown["mode"]), ("connected", "rfb"), shown)
        self.assertIn("noVNC", shown["status"])
        yield wait(0.5)
        top, bottom, path = yield self.screen_colours("#screen canvas")
        self.assertTrue(close_to(top, ORANGE), f"top {top} is not orange; see {path}")
        self.assertTrue(close_to(bottom, SKY), f"bottom {bottom} is not sky blue; see {path}")

        # A key typed into the page reaches the X display.
        self.desktop.clear_key_events()
        yield self.browser.command("click", selector="#screen canvas")
        yield self.browser.command("press", key="q")
        yield self.desktop.wait_for_key("q", "KeyPress")
        yield self.desktop.wait_for_key("q", "KeyRelease")
        session = next(iter(self.server.rfb.sessions))
        self.assertGreater(session.bytes_to_browser, 1000)
