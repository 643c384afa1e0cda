"""``python -m unbroken.cli``."""

import sys

from .main import main

sys.exit(main())
