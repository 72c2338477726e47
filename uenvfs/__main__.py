import sys

# run, start and attach begin job steps: they skip the imports that only the rest needs.
if len(sys.argv) > 1 and sys.argv[1] in ("run", "start", "attach"):
    from .client.run import main
else:
    from .client.cli import main

sys.exit(main())
