"""``python -m perflow_core.lab.benchmark``: the error-vs-NFE benchmark (see ``run.py``)."""

import sys

from .run import main

sys.exit(main())
