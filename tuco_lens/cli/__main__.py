"""``python -m tuco_lens.cli`` == ``tuco-lens``."""

import sys

from tuco_lens.cli import main

sys.exit(main())
