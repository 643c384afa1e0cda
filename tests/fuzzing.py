"""Shared hypothesis settings of the parser fuzz tests.

CI runs 200 derandomized examples per test (reproducible).  ``bench/fuzz_parsers.py`` sets
``UNBROKEN_FUZZ_EXAMPLES`` to run many more, randomized, so each soak explores new inputs
(hypothesis prints the seed and the failing example to replay one).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("UNBROKEN_FUZZ_EXAMPLES", "200"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize="UNBROKEN_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow], database=None)
