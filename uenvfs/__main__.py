"""`python -m uenvfs`: how a keeper starts its server (keeper/protocol.py `server_argv`), and
the `uenvfs` command by another name (its script calls client/cli.py `main`). `run` and `start`
go straight to client/run.py, `attach` to client/attach.py, every other subcommand to
client/cli.py."""

import sys

# run, start and attach begin job steps: they skip the imports that only the rest needs.
if len(sys.argv) > 1 and sys.argv[1] in ("run", "start"):
    from .client.run import main
elif len(sys.argv) > 1 and sys.argv[1] == "attach":
    from .client.attach import main
else:
    from .client.cli import main

sys.exit(main())
