"""``python -m perflow_core.lab``: the `perflow` command line."""

import sys

from .cli import main

sys.exit(main())
