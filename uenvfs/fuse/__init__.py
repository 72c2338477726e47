"""The FUSE side: the pyfuse3 adapter and its parts (inodes, handles, listings, the mount
root, uses found by scanning)."""
