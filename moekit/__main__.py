"""``python -m moekit``: the same as the ``moekit`` command."""

import sys

from .cli import main

sys.exit(main())
