"""uenvfs: a lazy-mounting FUSE filesystem for uenv SquashFS images on HPC compute nodes."""

__version__ = "0.1.0"
MOUNTPOINT = "/run/pact/uenv"  # where uenvfs serves by default (config.DEFAULT_MOUNTPOINT)
