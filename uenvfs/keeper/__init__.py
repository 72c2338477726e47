"""`uenvfs serve`: the process that holds the FUSE connection and keeps a server running (see
keeper/keeper.py). The standard library only."""
