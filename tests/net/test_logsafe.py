"""Client-supplied text in log lines (logsafe.py): nothing can forge a line or drive a terminal."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.net.logsafe import MAX_LOGGED_CHARS, log_safe


class LogSafeTests(SynchronousTestCase):
    def test_printable_text_unchanged(self) -> None:
        for text in ("Mozilla/5.0 (X11; Linux x86_64)", "/api/vm/7/guacamole/vnc", "José 日本"):
            self.assertEqual(log_safe(text), text)

    def test_line_breaks_and_escapes_escaped(self) -> None:
        self.assertEqual(log_safe("a\r\nb"), "a\\x0d\\x0ab")
        self.assertEqual(log_safe("\x1b[2J\x1b]0;x\x07"), "\\x1b[2J\\x1b]0;x\\x07")
        self.assertEqual(log_safe("\x00\t\x7f"), "\\x00\\x09\\x7f")

    def test_c1_controls_and_unicode_separators_escaped(self) -> None:
        self.assertEqual(log_safe("\x85\x9b"), "\\x85\\x9b")
        self.assertEqual(log_safe("a\u2028b\u2029c\u202ed"), "a\\u2028b\\u2029c\\u202ed")

    def test_the_backslash_is_doubled_so_escapes_cannot_be_forged(self) -> None:
        self.assertEqual(log_safe("\\x0a"), "\\\\x0a")
        self.assertNotEqual(log_safe("\\x0a"), log_safe("\n"))

    def test_bytes_utf8_and_undecodable(self) -> None:
        self.assertEqual(log_safe("é".encode()), "é")
        self.assertEqual(log_safe(b"\xff\xfe ok\n"), "\\xff\\xfe ok\\x0a")
        self.assertEqual(log_safe(None), "-")

    def test_length_bounded(self) -> None:
        self.assertEqual(log_safe("x" * 10_000), "x" * MAX_LOGGED_CHARS + "...")
        self.assertEqual(log_safe("abcdef", 3), "abc...")
        # Escapes are applied after the cut: never half an escape.
        self.assertEqual(log_safe("ab\ncd", 3), "ab\\x0a...")

    def test_nothing_unsafe_comes_out(self) -> None:
        everything = "".join(chr(c) for c in range(0x3000))
        for char in log_safe(everything):
            self.assertTrue(char.isprintable(), repr(char))
