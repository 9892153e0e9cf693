"""`python -m snapdisk.cli`: the same as the `snapdisk` command."""

import sys

from . import main

sys.exit(main())
