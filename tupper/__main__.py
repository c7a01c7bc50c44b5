"""`python -m tupper`: the CLI."""

import sys

from tupper.cli.main import main

sys.exit(main())
