"""``python -m consoleproxy``: the ``consoleproxy`` command."""

import sys

from consoleproxy.cli import main

sys.exit(main())
