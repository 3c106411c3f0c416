"""``python -m hellora_trl.cli`` = the ``hellora`` console script."""

import sys

from . import main

sys.exit(main())
