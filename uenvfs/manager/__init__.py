"""The mount lifecycle of every image: mounting, backends, the use counts, the hold timer, the
journal; what the filesystem sees of it, what `.control` commands do, reload and restart."""
