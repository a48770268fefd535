"""detkit backbone family plugin: resnet (being written)."""
