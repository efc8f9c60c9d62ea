"""``python -m lsa_ext.cli``: the same as the ``lsa`` command."""

import sys

from lsa_ext.cli import main

sys.exit(main())
