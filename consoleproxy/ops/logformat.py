"""
Log line formats for twistd's ``--logger``: plain text for the journal, or JSON.

twistd's own observer prefixes every line with a timestamp.  Under systemd the
journal stamps each line itself, so C{journal_observer} writes the text alone,
with the ``<N>`` priority prefix that journald reads (``SyslogLevelPrefix``):
an error is an error in ``journalctl -p err``.  C{json_observer} writes one
JSON object a line with the fields of the text line (time, level, system,
message, and the traceback of a failure), for log shippers.

Both write to standard output, which is where a service's output goes under
systemd; ``consoleproxy serve --log-format`` picks one, and plain twistd takes
them as ``twistd --logger consoleproxy.ops.logformat.json_observer consoleproxy``.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEvent,
)

#: syslog priorities by Twisted log level (what journald reads from ``<N>``).
_PRIORITY = {
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}


def _system(event: dict[str, Any]) -> str:
    """What twistd's text line shows in brackets: the system, else the namespace."""
    return str(event.get("log_system") or event.get("log_namespace") or "-")


def _text(event: dict[str, Any]) -> str:
    """The event's message, with its failure's traceback when it has one."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
    return text


def _level(event: dict[str, Any]) -> Any:
    level = event.get("log_level", LogLevel.info)
    # Twisted's legacy log.err() events carry isError without a level.
    if event.get("isError") and level == LogLevel.info:
        return LogLevel.error
    return level


def format_journal(event: dict[str, Any]) -> str:
    """One event as journal lines: ``<priority>[system] message``, no timestamp."""
    priority = _PRIORITY.get(_level(event), 6)
    lines = _text(event).splitlines() or [""]
    return "".join(f"<{priority}>[{_system(event)}] {line}\n" for line in lines)


def format_json(event: dict[str, Any]) -> str:
    """One event as one JSON object on one line."""
    when = event.get("log_time")
    stamp = (
        datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="milliseconds")
        if when is not None
        else None
    )
    record = {
        "time": stamp,
        "level": _level(event).name,
        "system": _system(event),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def journal_observer(out: IO[str] | None = None) -> ILogObserver:
    """A twistd ``--logger`` factory: text lines for journald on standard output."""
    return FileLogObserver(out or sys.stdout, format_journal)


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """A twistd ``--logger`` factory: JSON lines on standard output."""
    return FileLogObserver(out or sys.stdout, format_json)


def under_systemd(environ: dict[str, str]) -> bool:
    """Whether systemd started this process with its output going to the journal."""
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))
