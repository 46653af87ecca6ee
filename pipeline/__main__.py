"""`python -m pipeline` is the `softmix` command."""

import sys

from .cli import main

sys.exit(main())  # main() without arguments ends the process itself
