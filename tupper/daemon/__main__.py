"""`python -m tupper.daemon`: tupperd."""

import sys

from tupper.daemon.tupperd import main

sys.exit(main())
