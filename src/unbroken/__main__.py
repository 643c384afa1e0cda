"""``python -m unbroken``: the ``unbroken`` command line (as ``python -m unbroken.cli``)."""

import sys

from unbroken.cli.main import main

sys.exit(main())
