"""``python -m imagen`` runs the ``imagen`` command (see :mod:`imagen.cli`)."""

import sys

from imagen.cli import main

sys.exit(main())
