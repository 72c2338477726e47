import sys

# run, start and attach begin job steps: they skip the imports that only the rest needs.
if len(sys.argv) > 1 and sys.argv[1] in ("run", "start", "attach"):
    from .run import main
else:
    from .cli import main

sys.exit(main())
