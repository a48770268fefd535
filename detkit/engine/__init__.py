"""The machinery every command runs on: checkpoints (``checkpoint``), reading state dicts (``state_dict``),
devices and autocast (``devices``), the torchrun glue (``distributed``) and atomic file writes (``files``).
It knows nothing of detector families, datasets or training recipes."""
