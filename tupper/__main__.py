"""`python -m tupper`: the CLI."""

import sys

from tupper.cli import main

sys.exit(main())
