"""
Client-supplied text made safe for a log line.

A path segment is URL-decoded (``%0a`` is a line feed), a User-Agent or
Referer is whatever bytes the client sent, a query value (a zone name) the
same: written to a log as they are, a CR or LF forges a whole line of the
operator's log, and an escape character (ESC, CSI) rewrites the terminal of
whoever reads it with ``tail``.  Every log line that carries a value the
client chose passes it through L{log_safe} first: control characters (C0,
DEL, C1), the Unicode line and paragraph separators, and any other
character Python does not consider printable become ``\\xNN`` /
``\\uNNNN`` escapes, and the backslash itself is doubled, so that the
escaping cannot be forged either.  Printable text, non-ASCII letters
included, stays as it is.
"""

from __future__ import annotations

#: Longest value written to a log line; the rest is replaced by an ellipsis.
MAX_LOGGED_CHARS = 512


def log_safe(value: str | bytes | None, limit: int = MAX_LOGGED_CHARS) -> str:
    """
    C{value} as text fit for one log line (see the module docstring).

    Bytes are read as UTF-8, undecodable bytes written as ``\\xNN``; C{None} is
    ``-``.  At most C{limit} characters of the value are kept (a client must
    not write megabytes into the log through one header).
    """
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    truncated = len(value) > limit
    if truncated:
        value = value[:limit]
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if not value.isprintable():
        # Fast path above: the common header or path is printable already.
        value = "".join(c if c.isprintable() else _escape(c) for c in value)
    return value + "..." if truncated else value


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # an undecodable byte (surrogateescape)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
