"""``python -m a2sf``: the ``a2sf`` command (see :mod:`a2sf.cli`)."""
import sys

from .cli import main

sys.exit(main())
