"""`python -m uenvfs.keeper`: a keeper started by a server whose keeper died, or the
installed keeper that a `restart` runs (exec, same pid); see keeper/keeper.py."""

import os
import sys

from .protocol import ENV_LOG_LEVEL
from .serve import adopt_server, setup_logging

setup_logging(os.environ.get(ENV_LOG_LEVEL, "INFO"))
sys.exit(adopt_server())
