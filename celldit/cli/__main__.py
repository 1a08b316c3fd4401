"""``python -m celldit.cli``: the same as the ``celldit`` console script."""

import sys

from . import main

sys.exit(main())
