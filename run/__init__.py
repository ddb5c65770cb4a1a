"""A run: its config (every section) and its directory on disk."""
