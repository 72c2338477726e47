import sys

if len(sys.argv) > 1 and sys.argv[1] in ("run", "start"):  # job steps: skip what they need not
    from .run import main
else:
    from .cli import main

sys.exit(main())
