"""``python -m lsa_ext.cli ...`` runs the ``lsa`` command (e.g. under ``torchrun -m``)."""

import sys

from lsa_ext.cli import main

sys.exit(main())
