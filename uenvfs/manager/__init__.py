"""The mount lifecycle of every image: mounting, backends, the hold timer, the journal,
what `.control` commands do."""
