"""System calls and kernel tables: libc, the mount table, loop devices, the FUSE device,
namespaces, scans of /proc. The standard library only."""
