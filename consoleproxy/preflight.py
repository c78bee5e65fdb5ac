"""
``consoleproxy check-config``: the checks start-up makes, without starting.

Start-up stops at the first problem; an operator editing a file wants them
all, so the checks here are made one after the other, each reporting its own
problem, in the order start-up meets them: the file and its values
(``Config.load``), the endpoint strings, the token key file and the spent-token
file (read, never created: checking must not change the machine), the cloud
(inventory or oned's settings and credential file), the SSH tunnels' keys, the
federation's trust roots.  With ``probe`` it also listens on each endpoint for
a moment (a port in use is start-up's most common failure) and asks guacd and
the cloud what ``/readyz`` asks them.

The builders are ``tap``'s own, so that a check here is the check there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react

from consoleproxy import tap
from consoleproxy.clouds.inventory import InventoryError
from consoleproxy.config import Config, ConfigError
from consoleproxy.ops.health import Advisory
from consoleproxy.tokens import KeyFileError, KeyRing

#: Seconds each probe (a listen, guacd, the cloud) may take.
PROBE_TIMEOUT = 5.0


def _writable_directory(path: str) -> str | None:
    """Why a file could not be created at C{path}, or C{None}."""
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory):  # created at start (mode 0700) when missing
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create {path}: {directory} is not writable"
    return None


def _file_checks(config: Config, reactor: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Each static check, named by the key it concerns."""

    def key_file() -> None:
        if os.path.exists(config.key_file):
            try:
                KeyRing.from_file(config.key_file, create=False)
            except KeyFileError as e:
                raise ConfigError(Config.key_of("key_file"), str(e)) from e
        elif (why := _writable_directory(config.key_file)) is not None:
            raise ConfigError(Config.key_of("key_file"), why)

    def spent_file() -> None:
        path = config.spent_path()
        if os.path.exists(path):
            if not os.access(path, os.R_OK | os.W_OK):
                raise ConfigError(Config.key_of("spent_file"), f"cannot read and write {path}")
        elif (why := _writable_directory(path)) is not None:
            raise ConfigError(Config.key_of("spent_file"), why)

    return [
        ("server.listen", lambda: config.server_endpoints(reactor)),
        ("guacd.endpoint", lambda: config.guacd_endpoint(reactor)),
        ("tokens.key_file", key_file),
        ("tokens.spent_file", spent_file),
        ("cloud", lambda: tap.build_cloud(config, reactor)),
        ("tunnels", lambda: tap.build_tunnels(config, reactor)),
        ("federation", lambda: tap.build_federation(config)),
    ]


def _problem(error: Exception) -> str:
    if isinstance(error, ConfigError | KeyFileError | InventoryError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class _Nothing(Protocol):
    """Accepts and closes (a listen probe)."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


@inlineCallbacks
def _probe(config: Config, reactor: Any, cloud: Any):  # type: ignore[no-untyped-def]
    """Problems found by listening on each endpoint and asking guacd and the cloud."""
    problems: list[str] = []
    for description, endpoint in zip(config.listen, config.server_endpoints(reactor), strict=True):
        try:
            port = yield endpoint.listen(Factory.forProtocol(_Nothing))
        except Exception as e:
            problems.append(f"server.listen: cannot listen on {description}: {_reason(e)}")
        else:
            yield port.stopListening()
    checks = tap.readiness_checks(config, config.guacd_endpoint(reactor), cloud)
    names = list(checks)

    def ask(check: Any) -> Deferred[Any]:
        run = check.check if isinstance(check, Advisory) else check
        asking = maybeDeferred(run)
        asking.addTimeout(PROBE_TIMEOUT, reactor)
        return asking.addCallbacks(lambda _: None, lambda failure: failure.value)

    answers = yield gatherResults([ask(checks[name]) for name in names])
    for name, answer in zip(names, answers, strict=True):
        if answer is not None:
            problems.append(f"{name}: does not answer: {_reason(answer)}")
    return problems


def _reason(error: Any) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def check(path: str, probe: bool = False) -> list[str]:
    """Every problem of the configuration file at C{path}, one line each."""
    try:
        config = Config.load(path)
    except ConfigError as e:
        return [str(e)]
    found: list[str] = []

    def main(reactor: Any) -> Deferred[None]:
        cloud = None
        for name, run in _file_checks(config, reactor):
            try:
                built = run()
            except Exception as e:
                found.append(_problem(e))
            else:
                cloud = built if name == "cloud" else cloud
        if not probe or cloud is None:
            return _closed(cloud)
        probing = _probe(config, reactor, cloud)
        probing.addCallback(found.extend)
        return probing.addBoth(lambda result: _closed(cloud, result))

    try:
        react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            found.append(f"the check itself failed (exit {e.code})")
    return found


def _closed(cloud: Any, result: Any = None) -> Deferred[Any]:
    """Close what the cloud opened (oned's connection pool), then pass C{result} on."""
    closing = maybeDeferred(getattr(cloud, "close", lambda: None))
    return closing.addCallback(lambda _: result)
