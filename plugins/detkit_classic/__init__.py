"""detkit backbone family plugin: classic (being written)."""
