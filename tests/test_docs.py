"""
The documentation stays true to the code: every configuration key the code reads is in the
configuration reference and every key there is read by the code; the README stays short and
its links lead somewhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields

from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "docs", "configuration.md")
#: Keys that hold tables, as the reference names what is inside them.
TABLE_KEYS = {"zones": "zones.<id>.url"}


def code_keys() -> set[str]:
    """Every dotted key the configuration reads."""
    keys = {f.metadata["key"] for f in fields(Config) if "key" in f.metadata}
    return {TABLE_KEYS.get(key, key) for key in keys}


def documented_keys(text: str) -> set[str]:
    """
    The keys of the reference's table: the backticked names of each row's first cell;
    a name without a section takes the section of the name before it in that cell.
    """
    keys = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        section = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            table = re.fullmatch(r"\[\[?([\w.<>]+)\]\]?\s*(\w*)", name)
            if table:
                head, name = table.groups()
                keys.add(f"{head}.{name}" if name else head)
            elif "." in name:
                section = name.split(".", 1)[0]
                keys.add(name)
            else:
                keys.add(f"{section}.{name}")
    return keys


class ConfigurationReferenceTests(SynchronousTestCase):
    def test_parser_reads_every_row_form(self) -> None:
        table = (
            "| `a.b` | | 1 | x |\n"
            "| `c.d`, `e`, `f` | | 1 | x |\n"
            "| `[zones.<id>] url` | | | x |\n"
            "| `g.h`, `[[tunnels.rule]]` | | | x |\n"
            "| not a key | | | |\n"
        )
        self.assertEqual(
            documented_keys(table),
            {"a.b", "c.d", "c.e", "c.f", "zones.<id>.url", "g.h", "tunnels.rule"},
        )

    def test_every_key_documented_and_every_documented_key_read(self) -> None:
        with open(REFERENCE, encoding="utf-8") as f:
            documented = documented_keys(f.read())
        code = code_keys()
        self.assertEqual(
            (sorted(code - documented), sorted(documented - code)),
            ([], []),
            "(keys missing from docs/configuration.md, keys documented but not read)",
        )


class ReadmeTests(SynchronousTestCase):
    def readme(self) -> str:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            return f.read()

    def test_short(self) -> None:
        size = len(self.readme().encode("utf-8"))
        self.assertLessEqual(size, 12_000, "README.md is long: move details to docs/")

    def test_local_links_exist(self) -> None:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", self.readme()):
            self.assertTrue(os.path.exists(os.path.join(ROOT, target)), target)
