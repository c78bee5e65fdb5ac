"""
consoleproxy's tests.

Importing this package (trial does, in every worker) makes a
C{DeprecationWarning} raised from consoleproxy's own modules an error, so
that code relying on deprecated behaviour fails here before a Python or
library upgrade breaks it (third-party modules' warnings stay warnings).

Why a filter here and not C{-W error::DeprecationWarning:consoleproxy} in
C{scripts/test}: the module field of C{-W} and C{PYTHONWARNINGS} is
escaped and anchored (C{re.escape(field) + r"\\Z"}), so it matches the
module named exactly C{consoleproxy}, never C{consoleproxy.tokens}.  And
trial collects a test's warnings, then re-emits them with
C{warnings.warn_explicit} and no module, which makes the module the file's
path without C{.py}; L{OWN_MODULES} matches both forms.
"""

from __future__ import annotations

import os
import re
import warnings

import consoleproxy

#: consoleproxy's modules as the warnings machinery names them: the dotted
#: name (the warning's frame's C{__name__}), or the file's path without
#: C{.py} (a warning re-emitted by trial).
OWN_MODULES = (
    r"(?:consoleproxy(?:\.|\Z)|"
    + re.escape(os.path.dirname(os.path.abspath(consoleproxy.__file__)) + os.sep)
    + ")"
)

warnings.filterwarnings("error", category=DeprecationWarning, module=OWN_MODULES)
