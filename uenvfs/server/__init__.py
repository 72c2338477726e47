"""One server process: wiring the manager and the FUSE side, resuming a live connection,
handing over at a restart."""
