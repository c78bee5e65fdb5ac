"""
The suite's warnings filter (tests/__init__.py): a DeprecationWarning from
consoleproxy's own modules fails the test that triggered it, one from a
third-party module does not.  Each case runs a small trial test inside a
test, the way the suite runs (trial collects the warning, then re-emits it).
"""

from __future__ import annotations

import os
import warnings

from twisted.trial.reporter import TestResult
from twisted.trial.unittest import SynchronousTestCase

import consoleproxy
import twisted


def _warn_from(module: str, filename: str) -> None:
    """A DeprecationWarning raised by code of C{module} (defined in C{filename})."""
    code = compile("import warnings\nwarnings.warn('old', DeprecationWarning)\n", filename, "exec")
    exec(code, {"__name__": module})


def _outcome(module: str, filename: str) -> TestResult:
    class Inner(SynchronousTestCase):
        def test_it(self) -> None:
            _warn_from(module, filename)

    result = TestResult()
    with warnings.catch_warnings():
        # The suite's own filters: without the "always" this (outer) test's
        # run put in front to collect warnings.
        warnings.filters.remove(("always", None, Warning, None, 0))
        Inner("test_it").run(result)
    return result


class OwnDeprecationsAreErrorsTests(SynchronousTestCase):
    def test_own_module_fails(self) -> None:
        path = os.path.join(os.path.dirname(consoleproxy.__file__), "tokens.py")
        result = _outcome("consoleproxy.tokens", path)
        self.assertEqual(len(result.errors), 1)
        self.assertTrue(result.errors[0][1].check(DeprecationWarning))

    def test_own_module_fails_outside_trial(self) -> None:
        path = os.path.join(os.path.dirname(consoleproxy.__file__), "tokens.py")
        with warnings.catch_warnings():
            # The suite's filters, without trial's collecting "always" in front.
            warnings.filters[:] = [f for f in warnings.filters if f[0] == "error"]
            self.assertRaises(DeprecationWarning, _warn_from, "consoleproxy.tokens", path)

    def test_third_party_module_does_not(self) -> None:
        path = os.path.join(os.path.dirname(twisted.__file__), "python", "compat.py")
        result = _outcome("twisted.python.compat", path)
        self.assertEqual(result.errors, [])
        self.assertTrue(result.wasSuccessful())
        self.flushWarnings()

    def test_a_tests_module_does_not(self) -> None:
        result = _outcome("tests.helpers.support", __file__)
        self.assertEqual(result.errors, [])
        self.flushWarnings()
