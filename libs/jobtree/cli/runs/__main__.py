"""`python -m jobtree.cli.runs`: kubectl-runs."""

import sys

from jobtree.cli.runs import main

sys.exit(main())
