"""`python -m uenvfs.keeper`: a keeper started by a server whose keeper died, or the
installed keeper that a `restart` runs (exec, same pid); see keeper.py."""

import os
import sys

from .keeper import adopt_server, setup_logging

setup_logging(os.environ.get("UENVFS_LOG_LEVEL", "INFO"))
sys.exit(adopt_server())
