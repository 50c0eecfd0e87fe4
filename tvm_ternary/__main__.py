"""``python -m tvm_ternary`` runs the ``tvm-ternary`` command line."""

import sys

from .cli import main

sys.exit(main())
