"""python -m multitune: the same as the multitune command."""

import sys

from multitune.cli import main

sys.exit(main())
