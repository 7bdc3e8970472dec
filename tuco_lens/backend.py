"""Moved to :mod:`tuco_lens.backends` (temporary alias while the package is restructured)."""

from tuco_lens.backends import *  # noqa: F403
from tuco_lens.backends import __all__  # noqa: F401
