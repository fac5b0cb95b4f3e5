"""``python -m grace_quant``: the ``grace-quant`` command line."""

import sys

from grace_quant.cli import main

sys.exit(main())
