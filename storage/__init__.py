"""Content store: CIDs, backends, verification."""
