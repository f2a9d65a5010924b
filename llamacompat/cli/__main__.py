"""``python -m llamacompat.cli``: the ``llamacompat`` command."""

import sys

from .main import main

sys.exit(main())
