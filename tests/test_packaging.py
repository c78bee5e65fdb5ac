"""The wheel carries everything the server serves: built, installed elsewhere, run from ``/``.

The wheel is built by pip from a copy of this tree (so the checkout stays clean), installed
without its dependencies into a fresh virtualenv in a temporary directory, and run as
``twistd -n consoleproxy`` with ``/`` as working directory and no PYTHONPATH.  Its
dependencies come from this checkout's virtualenv, added after the new one's site-packages
(a ``.pth`` line), so only the wheel provides consoleproxy: the test checks which files the
installed package imports, then runs ``consoleproxy serve`` from ``/`` and checks that it
serves the libraries' bytes the wheel holds, and that the page works in headless Chromium
against the fake guacd.  A tree without ``node_modules``
fails to build, naming what is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from consoleproxy.web import assets
from tests.helpers.browser import Browser, open_guacamole_console, require_browser
from tests.helpers.consoleserver import console_inventory
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.realservers import free_port
from tests.helpers.support import basic, http_request
from tests.helpers.twistd import base_environment, start_twistd, wait_until_serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_MODULES = os.path.join(ROOT, "node_modules")
#: What is not copied for the build: local state, caches, other builds.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "node_modules",
    "_trial_temp*",
    "build",
    "dist",
    "*.egg-info",
    "bench",
    ".hypothesis",
    ".ruff_cache",
    "__pycache__",
    "vendor",
)
GUAC_ENTRY = "guacamole-common-js/dist/esm/guacamole-common.min.js"


def copy_tree(destination: str, node_modules: bool) -> str:
    """A copy of the checkout to build from, with or without (a link to) node_modules."""
    source = os.path.join(destination, "src")
    shutil.copytree(ROOT, source, ignore=NOT_COPIED, symlinks=True)
    if node_modules:
        os.symlink(NODE_MODULES, os.path.join(source, "node_modules"))
    return source


@inlineCallbacks
def run(*argv: str, cwd: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Run a command; fire with (exit code, output and errors)."""
    out, err, code = yield getProcessOutputAndValue(
        argv[0], argv[1:], env=env or base_environment(), path=cwd, reactor=reactor
    )
    return code, (out + err).decode(errors="replace")


def offline_build_tools() -> bool:
    """Whether this Python has what the build needs (setup.cfg's test extra installs it)."""
    try:
        import setuptools  # noqa: PLC0415
        import wheel  # noqa: F401, PLC0415
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


@inlineCallbacks
def build_wheel(testcase: TestCase, source: str):  # type: ignore[no-untyped-def]
    """
    pip wheel of C{source}: offline with this Python's setuptools and wheel when it has
    them, else in pip's isolated build environment (setuptools from the index or cache).
    """
    out = os.path.abspath(testcase.mktemp())
    offline = ["--no-build-isolation", "--no-index"] if offline_build_tools() else []
    code, output = yield run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        *offline,
        "--disable-pip-version-check",
        "-q",
        "-w",
        out,
        source,
        cwd=source,
    )
    return code, output, glob.glob(os.path.join(out, "consoleproxy-*.whl"))


class WheelTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if not os.path.isfile(os.path.join(NODE_MODULES, "guacamole-common-js", "package.json")):
            raise SkipTest("npm packages are not installed (scripts/setup runs npm ci)")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    @inlineCallbacks
    def test_build_without_node_modules_fails_clearly(self):  # type: ignore[no-untyped-def]
        source = copy_tree(self.directory, node_modules=False)
        code, output, wheels = yield build_wheel(self, source)
        self.assertNotEqual(code, 0)
        self.assertEqual(wheels, [])
        self.assertIn("npm package guacamole-common-js is not installed", output)
        self.assertIn("run `npm ci`", output)

    @inlineCallbacks
    def install(self):  # type: ignore[no-untyped-def]
        """Build the wheel; install it into a fresh virtualenv; return its python."""
        source = copy_tree(self.directory, node_modules=True)
        code, output, wheels = yield build_wheel(self, source)
        self.assertEqual((code, len(wheels)), (0, 1), output)
        self.wheel = zipfile.ZipFile(wheels[0])
        self.addCleanup(self.wheel.close)
        names = self.wheel.namelist()
        vendor = "consoleproxy/web/vendor/"
        for name in (
            GUAC_ENTRY,
            "guacamole-common-js/LICENSE",
            "guacamole-common-js/package.json",
            "@novnc/novnc/core/rfb.js",
            "@novnc/novnc/LICENSE.txt",
            "@novnc/novnc/docs/LICENSE.MPL-2.0",
            "@novnc/novnc/vendor/pako/LICENSE",
        ):
            self.assertIn(vendor + name, names)
        # Only what is served (and licences, package.json): no READMEs, docs or tests.
        served = (".js", ".mjs", ".css", ".svg", ".png")
        extra = [
            n
            for n in names
            if n.startswith(vendor)
            and not n.endswith((*served, "package.json"))
            and "LICENSE" not in n
            and not n.endswith("AUTHORS")
        ]
        self.assertEqual(extra, [])
        venv = os.path.join(self.directory, "venv")
        code, output = yield run(
            sys.executable, "-m", "venv", "--without-pip", venv, cwd=self.directory
        )
        self.assertEqual(code, 0, output)
        python = os.path.join(venv, "bin", "python")
        code, output = yield run(
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            wheels[0],
            cwd=self.directory,
        )
        self.assertEqual(code, 0, output)
        # The dependencies: this virtualenv's site-packages, after the new one's.
        (site,) = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
        dependencies = sysconfig.get_paths()["purelib"]
        with open(os.path.join(site, "zz-dependencies.pth"), "w") as f:
            f.write(f"import site; site.addsitedir({dependencies!r})\n")
        code, output = yield run(
            python,
            "-c",
            "import consoleproxy.web.assets as a; print(a.__file__); "
            "print(a.StaticFiles().node_modules)",
            cwd="/",
        )
        self.assertEqual(code, 0, output)
        self.assertEqual(
            output.split(),
            [os.path.join(site, "consoleproxy/web/assets.py"), os.path.join(site, vendor)[:-1]],
        )
        return python

    @inlineCallbacks
    def test_installed_wheel_serves_the_page_from_root(self):  # type: ignore[no-untyped-def]
        require_browser()
        python = yield self.install()
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        port = free_port()
        inventory = os.path.join(self.directory, "inventory.toml")
        with open(inventory, "w") as f:
            f.write(console_inventory())
        config = os.path.join(self.directory, "consoleproxy.toml")
        with open(config, "w") as f:
            f.write(
                f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
                f'[guacd]\nendpoint = "tcp:127.0.0.1:{guacd.port}"\n'
                f'[tokens]\nkey_file = "{self.directory}/keys"\n'
                f'[inventory]\npath = "{inventory}"\n'
                f'[relay]\nallowed_origins = ["http://127.0.0.1:{port}"]\n'
            )
        # What an operator runs: the installed command, from /, no PYTHONPATH.
        self.assertTrue(os.access(os.path.join(os.path.dirname(python), "consoleproxy"), os.X_OK))
        process = start_twistd(
            self, f"--config={config}", python=python, cwd="/", env=base_environment(), serve=True
        )
        yield wait_until_serving(self, process, f"http://127.0.0.1:{port}/healthz")
        self.assertNotIn(b"libraries are not installed", process.output)
        code, _, page = yield http_request(
            port, "/console/7/vnc", headers={b"Authorization": basic("alice", "wonderland")}
        )
        self.assertEqual(code, 200)
        url = "/static/vendor/guacamole-common-js@1.5.0/guacamole-common.min.js"
        self.assertIn(url.encode(), page)
        code, _, body = yield http_request(port, url)
        self.assertEqual(code, 200)
        self.assertEqual(body, self.wheel.read("consoleproxy/web/vendor/" + GUAC_ENTRY))
        code, _, body = yield http_request(port, "/static/vendor/novnc@1.7.0/core/rfb.js")
        self.assertEqual(code, 200)
        # The page in a browser: the libraries load and a console opens (fake guacd).
        browser = yield Browser.start(self)
        shown = yield open_guacamole_console(
            browser, guacd, f"http://127.0.0.1:{port}/console/7/vnc"
        )
        self.assertEqual(shown["status"], 200)
        self.assertEqual((shown["state"], shown["mode"]), ("connected", "guacamole"), shown)
        self.assertNotIn("not installed", shown["text"])


class LookupOrderTests(SynchronousTestCase):
    """Where the page's libraries come from: the override, the packaged copy, the checkout."""

    def test_order(self) -> None:
        packaged = os.path.abspath(self.mktemp())
        self.patch(assets, "packaged_vendor_dir", lambda: Path(packaged))
        # No packaged copy (a checkout): node_modules beside the source tree, if any.
        beside = Path(NODE_MODULES) if os.path.isdir(NODE_MODULES) else None
        self.assertEqual(assets.default_node_modules(), beside or Path.cwd() / "node_modules")
        os.makedirs(packaged)
        self.assertEqual(assets.default_node_modules(), Path(packaged))
        self.assertEqual(assets.StaticFiles().node_modules, Path(packaged))
        override = os.path.abspath(self.mktemp())
        self.assertEqual(assets.StaticFiles(override).node_modules, Path(override))

    def test_packaged_copy_is_inside_the_package(self) -> None:
        self.assertEqual(
            assets.packaged_vendor_dir(),
            Path(assets.__file__).resolve().parent / "vendor",
        )
