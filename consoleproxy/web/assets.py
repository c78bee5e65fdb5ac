"""
Static files of the console page: consoleproxy's own and the npm libraries.

The browser libraries are npm packages (``package.json`` and its lock file,
installed by ``scripts/setup`` with ``npm ci`` into ``node_modules``); nothing
is copied into the repository, but a wheel carries them (``setup.py`` copies
them into ``consoleproxy/web/vendor/`` of the build).  They are served under
``/static/vendor/`` with the installed version in the URL, so they can be
cached for good::

    /static/console.js, /static/console.css        consoleproxy/web/static/
    /static/vendor/guacamole-common-js@1.5.0/...   node_modules/guacamole-common-js/dist/esm/
    /static/vendor/novnc@1.7.0/...                 node_modules/@novnc/novnc/

Only the mounts above are served, only files with known extensions, with
their content type and ``nosniff``; directories are never listed; a path
segment that is empty, hidden (``.``), encoded (``%``) or not plain ASCII
is refused, and the resolved file must lie inside its mount (symbolic links
out of it are refused).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

#: Content types by file extension: anything else is not served.
CONTENT_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}
#: Own files are revalidated on every use; versioned vendor files are kept.
OWN_CACHE = b"no-cache"
VENDOR_CACHE = b"public, max-age=31536000, immutable"
_MAX_FILE_BYTES = 8 * 1024 * 1024
#: Bytes handed to the transport at once by L{BodyProducer}.
CHUNK_BYTES = 16 * 1024
#: Default seconds a static response may stall (its client not reading).
STALL_TIMEOUT = 10.0
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}")


@dataclass(frozen=True)
class VendorPackage:
    """
    One npm package the page uses.

    @ivar name: the URL name (``novnc``).
    @ivar package: the npm name (``@novnc/novnc``).
    @ivar subdirectory: the folder of the package that is served.
    @ivar entry: the module the page imports, relative to C{subdirectory}.
    """

    name: str
    package: str
    subdirectory: str
    entry: str


VENDOR_PACKAGES = (
    VendorPackage(
        "guacamole-common-js", "guacamole-common-js", "dist/esm", "guacamole-common.min.js"
    ),
    VendorPackage("novnc", "@novnc/novnc", "", "core/rfb.js"),
)


def own_static_dir() -> Path:
    """consoleproxy's own static files (``consoleproxy/web/static``)."""
    return Path(__file__).resolve().parent / "static"


def packaged_vendor_dir() -> Path:
    """
    The libraries a wheel carries (``consoleproxy/web/vendor``, laid out like
    ``node_modules``): ``setup.py`` copies them there at build time, so an
    installed consoleproxy serves its page from any directory.
    """
    return Path(__file__).resolve().parent / "vendor"


def default_node_modules() -> Path:
    """
    Where the libraries are when ``console.node_modules`` does not say: the
    packaged copy (a wheel), else ``node_modules`` beside the source tree
    (a checkout, where ``scripts/setup`` runs ``npm ci``), else the working
    directory's.
    """
    packaged = packaged_vendor_dir()
    if packaged.is_dir():
        return packaged
    beside = Path(__file__).resolve().parents[2] / "node_modules"
    if beside.is_dir():
        return beside
    return Path.cwd() / "node_modules"


@dataclass(frozen=True)
class _Mount:
    root: Path
    cache_control: bytes


@dataclass(frozen=True)
class _Cached:
    stamp: tuple[int, int]
    body: bytes
    etag: bytes


class StaticFiles:
    """
    Serves the console page's static files (see the module docstring).

    @ivar versions: the installed version of each vendor package by URL
        name, or C{None} when it is not installed.
    """

    def __init__(
        self,
        node_modules: str | Path | None = None,
        own: Path | None = None,
        *,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        """
        @param stall_timeout: seconds a response may wait for its client to
            read before the connection is aborted (L{BodyProducer}).
        """
        self.stall_timeout = stall_timeout
        self.node_modules = Path(node_modules) if node_modules else default_node_modules()
        self._own = _Mount(own or own_static_dir(), OWN_CACHE)
        self._vendor: dict[str, _Mount] = {}
        self.versions: dict[str, str | None] = {}
        for vendor in VENDOR_PACKAGES:
            folder = self.node_modules / vendor.package
            version = _installed_version(folder / "package.json")
            self.versions[vendor.name] = version
            if version is not None:
                self._vendor[f"{vendor.name}@{version}"] = _Mount(
                    folder / vendor.subdirectory, VENDOR_CACHE
                )
        self._cache: dict[Path, _Cached] = {}

    @property
    def missing(self) -> list[str]:
        """npm packages the page needs that are not installed."""
        return [v.package for v in VENDOR_PACKAGES if self.versions[v.name] is None]

    def entry_url(self, name: str, base: str = "") -> str | None:
        """The URL of a vendor package's entry module, or None when not installed."""
        for vendor in VENDOR_PACKAGES:
            version = self.versions.get(vendor.name)
            if vendor.name == name and version is not None:
                return f"{base}/static/vendor/{vendor.name}@{version}/{vendor.entry}"
        return None

    def render(self, request: Request, path: bytes) -> bytes:
        """Answer C{path} (the part after ``/static/``)."""
        found = self._find(path)
        if found is None:
            return _not_found(request)
        mount, file = found
        try:
            cached = self._read(file)
        except OSError:
            return _not_found(request)
        request.setHeader(b"Content-Type", CONTENT_TYPES[file.suffix])
        request.setHeader(b"Cache-Control", mount.cache_control)
        request.setHeader(b"ETag", cached.etag)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        asked = request.getHeader(b"if-none-match") or b""
        if cached.etag in [tag.strip() for tag in asked.split(b",")] or asked.strip() == b"*":
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Length", str(len(cached.body)).encode("ascii"))
        if request.method == b"HEAD":
            return b""
        BodyProducer(request, cached.body, self.stall_timeout).start()
        return NOT_DONE_YET

    def _find(self, path: bytes) -> tuple[_Mount, Path] | None:
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:
            return None
        segments = text.split("/")
        if not all(_SEGMENT.fullmatch(s) and ".." not in s for s in segments):
            return None
        if segments[0] == "vendor":
            if len(segments) < 3:
                return None
            mount = self._vendor.get(segments[1])
            rest = segments[2:]
        else:
            mount, rest = self._own, segments
        if mount is None:
            return None
        root = mount.root.resolve()
        file = root.joinpath(*rest).resolve()
        if not file.is_relative_to(root) or file.suffix not in CONTENT_TYPES:
            return None
        if not file.is_file():
            return None
        return mount, file

    def _read(self, file: Path) -> _Cached:
        status = file.stat()
        stamp = (status.st_mtime_ns, status.st_size)
        cached = self._cache.get(file)
        if cached is not None and cached.stamp == stamp:
            return cached
        if status.st_size > _MAX_FILE_BYTES:
            raise OSError(f"{file} is too large to serve")
        body = file.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'
        cached = _Cached(stamp, body, etag)
        self._cache[file] = cached
        return cached


def _installed_version(package_json: Path) -> str | None:
    try:
        version = json.loads(package_json.read_text("utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(version, str) or not _SEGMENT.fullmatch(version):
        return None
    return version


def _not_found(request: Request) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return b"Not found.\n"


@implementer(IPushProducer)
class BodyProducer:
    """
    Sends a (cached, shared) file body as fast as the client reads it.

    Returning the body from C{render} would copy all of it into the
    transport's buffer at once: a client that never reads would keep a copy
    of each file it asked for until the response deadline.  Here the body
    goes out in L{CHUNK_BYTES} pieces while the transport asks for more (it
    pauses its producer above its own buffer size, 64 KiB), so what one
    client holds is bounded by that buffer plus one chunk, whatever the file.

    A response paused for C{stall_timeout} seconds (the client reads
    nothing) is aborted: a stalled static-file client keeps its connection
    for that long only, not for the whole response deadline.
    """

    def __init__(self, request: Request, body: bytes, stall_timeout: float) -> None:
        self._request = request
        self._body = memoryview(body)
        self._offset = 0
        self._paused = False
        self._done = False
        self._stall_timeout = stall_timeout
        self._stall: IDelayedCall | None = None

    def start(self) -> None:
        """Register with the request and send what the transport takes."""
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(lambda _: self._stop())
        self.resumeProducing()

    def resumeProducing(self) -> None:
        """The transport wants more: send chunks until it pauses us or the end."""
        self._paused = False
        self._cancel_stall()
        while not self._paused and not self._done:
            if self._offset >= len(self._body):
                self._done = True
                self._request.unregisterProducer()
                self._request.finish()
                return
            end = self._offset + CHUNK_BYTES
            chunk = self._body[self._offset : end].tobytes()
            self._offset = end
            self._request.write(chunk)

    def pauseProducing(self) -> None:
        """The transport's buffer is full: wait, but not for ever."""
        self._paused = True
        if self._stall is None and not self._done:
            self._stall = self._request.channel.callLater(self._stall_timeout, self._stalled)

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._stop()

    def _stop(self) -> None:
        self._done = True
        self._cancel_stall()
        self._body = memoryview(b"")

    def _cancel_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        transport = self._request.channel.transport if self._request.channel else None
        self._stop()
        if transport is not None:
            transport.abortConnection()
