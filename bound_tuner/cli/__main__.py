"""``python -m bound_tuner.cli``: the ``bound-tuner`` command."""

import sys

from bound_tuner.cli import main

sys.exit(main())
