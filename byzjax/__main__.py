"""`python -m byzjax`: the command line."""

import sys

from byzjax.cli import main

sys.exit(main())
