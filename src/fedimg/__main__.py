"""``python -m fedimg``."""

import sys

from fedimg.cli import main

sys.exit(main())
