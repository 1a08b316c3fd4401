"""``python -m celldit.cli``: the same as the ``celldit`` console script."""

import sys

from . import console_main

sys.exit(console_main())
