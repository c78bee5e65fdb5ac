"""
``consoleproxy``: one command for operators.

    consoleproxy serve [--log-format text|json] [options of twistd consoleproxy]
    consoleproxy check-config FILE [--probe]
    consoleproxy passwd
    consoleproxy keygen
    consoleproxy version

``serve`` runs the same service as ``twistd -n --pidfile= consoleproxy``, in the
foreground (what systemd wants); ``twistd consoleproxy`` keeps working.  The
other subcommands never start the server.  Errors are one line on standard
error, and a non-zero exit: never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

import consoleproxy

PROG = "consoleproxy"
#: Distributions whose versions ``consoleproxy version`` names.
DEPENDENCIES = (
    "Twisted",
    "autobahn",
    "txaio",
    "cryptography",
    "pyOpenSSL",
    "service-identity",
    "argon2-cffi",
    "prometheus-client",
    "txredisapi",
)
LOG_OBSERVERS = {
    "json": "consoleproxy.ops.logformat.json_observer",
    "journal": "consoleproxy.ops.logformat.journal_observer",
}


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def serve_argv(log_format: str, rest: Sequence[str], environ: dict[str, str]) -> list[str]:
    """
    The twistd command line of C{consoleproxy serve}.

    Text logs keep twistd's own lines, except under systemd, where the journal
    stamps lines itself: there they go out without a timestamp.
    """
    argv = ["twistd", "--nodaemon", "--pidfile="]
    if log_format == "json":
        argv += ["--logger", LOG_OBSERVERS["json"]]
    elif _under_systemd(environ):
        argv += ["--logger", LOG_OBSERVERS["journal"]]
    return [*argv, "consoleproxy", *rest]


def _under_systemd(environ: dict[str, str]) -> bool:
    from consoleproxy.ops.logformat import under_systemd  # noqa: PLC0415

    return under_systemd(environ)


def serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the server in the foreground until it stops."""
    from twisted.scripts import twistd  # noqa: PLC0415 - chooses and installs the reactor

    if "--help-server" in rest:
        sys.argv = ["consoleproxy serve", "consoleproxy", "--help"]
    else:
        sys.argv = serve_argv(args.log_format, rest, dict(os.environ))
    twistd.run()
    return 0


def passwd(args: argparse.Namespace, rest: list[str]) -> int:
    """Read a password (twice from a terminal, once from a pipe), print its hash."""
    from consoleproxy.clouds.passwords import hash_password  # noqa: PLC0415

    try:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if password != getpass.getpass("Again: "):
                return _fail("the passwords differ")
        else:
            password = sys.stdin.readline().rstrip("\n")
    except (KeyboardInterrupt, EOFError):
        print(file=sys.stderr)
        return _fail("no password read", 130)
    if not password:
        return _fail("empty password")
    print(hash_password(password))
    return 0


def keygen(args: argparse.Namespace, rest: list[str]) -> int:
    """Print a new token key as one key-file line."""
    from consoleproxy.tokens import KeyRing  # noqa: PLC0415

    print(KeyRing.generate_line())
    return 0


def version(args: argparse.Namespace, rest: list[str]) -> int:
    """consoleproxy's version, Python's, and its key dependencies'."""
    print(f"consoleproxy {consoleproxy.__version__}")
    print(f"Python {sys.version.split()[0]}")
    for name in DEPENDENCIES:
        try:
            print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name} (not installed)")
    return 0


def check_config(args: argparse.Namespace, rest: list[str]) -> int:
    """Every check start-up makes, one line per problem; --probe also asks guacd and the cloud."""
    from consoleproxy.preflight import check  # noqa: PLC0415

    problems = check(args.file, probe=args.probe)
    for problem in problems:
        print(f"{args.file}: {problem}")
    if not problems:
        print(f"{args.file}: OK" + (" (guacd and the cloud answered)" if args.probe else ""))
    return 1 if problems else 0


def parser() -> argparse.ArgumentParser:
    """The command line of C{consoleproxy}."""
    top = argparse.ArgumentParser(
        prog=PROG, description="consoleproxy: a web console proxy for clouds."
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "serve",
        help="run the server in the foreground (the service of twistd consoleproxy)",
        description="Run the server in the foreground.  Options not listed here go to "
        "twistd consoleproxy (see: consoleproxy serve --help-server).",
    )
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines (without timestamps under systemd), or one JSON object a line",
    )
    run.set_defaults(handler=serve)
    checker = commands.add_parser(
        "check-config", help="check a configuration file without starting the server"
    )
    checker.add_argument("file", help="the TOML configuration file")
    checker.add_argument("--probe", action="store_true", help="also connect to guacd and the cloud")
    checker.set_defaults(handler=check_config)
    commands.add_parser(
        "passwd",
        help="hash a password for the inventory",
        description="Read a password (twice from a terminal, one line from a pipe) and "
        "print its Argon2id hash for an inventory user's password_hash.",
    ).set_defaults(handler=passwd)
    commands.add_parser(
        "keygen",
        help="print a new token key line",
        description="Print a new random token key as one line for tokens.key_file "
        "(put it first to rotate; keep the old line for one token lifetime).",
    ).set_defaults(handler=keygen)
    commands.add_parser(
        "version", help="print the versions of consoleproxy and its dependencies"
    ).set_defaults(handler=version)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    options, rest = parser().parse_known_args(arguments)
    handler: Callable[[argparse.Namespace, list[str]], int] = options.handler
    if rest and handler is not serve:
        return _fail(f"unknown arguments: {' '.join(rest)}", 2)
    try:
        return handler(options, rest)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def passwd_main() -> int:
    """``consoleproxy-passwd``: the same as ``consoleproxy passwd``."""
    return main(["passwd"])
