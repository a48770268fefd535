"""detkit."""
