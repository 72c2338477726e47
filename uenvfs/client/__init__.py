"""The `uenvfs` command line, and `run`, `start` and `attach`."""
