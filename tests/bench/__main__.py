"""``python -m tests.bench`` = ``./tests/bench/run`` without the bootstrap."""

import sys

from tests.bench.runner import main

sys.exit(main())
