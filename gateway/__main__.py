"""``python -m gateway`` behaves exactly like ``popgate``."""

import sys

from gateway.cli import main

sys.exit(main())
