"""``python -m vitlab`` (and ``torchrun -m vitlab``) run the command line."""

import sys

from vitlab.cli import main

sys.exit(main())
