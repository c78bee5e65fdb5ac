"""The code base stays ruff-clean (configuration in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("consoleproxy", "tests", "twisted", "bench", "scripts")


class LintTests(SynchronousTestCase):
    def ruff(self, *args: str) -> subprocess.CompletedProcess[str]:
        ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
        if ruff is None:
            raise SkipTest("ruff is not installed (scripts/setup installs it)")
        return subprocess.run(
            [ruff, *args, *(p for p in PATHS if os.path.isdir(os.path.join(ROOT, p)))],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )

    def test_ruff_check(self) -> None:
        result = self.ruff("check", "--output-format=concise")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruff_format(self) -> None:
        result = self.ruff("format", "--check")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
