"""`python -m agcl` = the `agcl` console script (the workflow rules call it this way)."""

import sys

from agcl.cli import main

sys.exit(main())
