"""`python -m uenvfs`: how a keeper starts its server (keeper/protocol.py `server_argv`), and
the `uenvfs` command by another name (its script calls client/cli.py `main`). `run`, `start`
and `attach` go straight to client/run.py, every other subcommand to client/cli.py."""

import sys

# run, start and attach begin job steps: they skip the imports that only the rest needs.
if len(sys.argv) > 1 and sys.argv[1] in ("run", "start", "attach"):
    from .client.run import main
else:
    from .client.cli import main

sys.exit(main())
