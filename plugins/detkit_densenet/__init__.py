"""detkit backbone family plugin: densenet (being written)."""
