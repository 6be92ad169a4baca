"""``python -m convert``: see :mod:`convert.cli`."""

import sys

from convert.cli import main

sys.exit(main())
