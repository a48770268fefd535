"""detkit backbone family plugin: inception (being written)."""
