"""``python -m izitorch``."""

import sys

from izitorch.cli import main

sys.exit(main())
