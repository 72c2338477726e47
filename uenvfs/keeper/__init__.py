"""`uenvfs serve`: the process that holds the FUSE connection and keeps a server running.
The standard library only."""
