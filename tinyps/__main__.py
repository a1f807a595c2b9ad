"""`python -m tinyps`: the same as the `tinyps` command (the launcher starts its children so)."""

import sys

from tinyps.cli import main

sys.exit(main())
