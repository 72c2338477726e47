"""Image files and where they come from: the catalog of sources, uenv repositories,
SquashFS checks, uenv metadata."""
