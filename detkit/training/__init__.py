"""Training: the registered schedules (``schedules``) drive the :class:`Trainer` (``trainer``: one stage of SGD
on the configured detector, as one process or under ``torchrun``), whose loop (``loop``) carries logging and
checkpointing as hooks; ``stages`` holds what staged schedules share; ``preflight`` checks the config's paths and
the work directory before a run starts."""
from detkit.training.loop import Hook, train_loop
from detkit.training.schedules import declared_schedules, resolve_schedule, train
from detkit.training.trainer import Trainer, train_stage

__all__ = ["Hook", "Trainer", "declared_schedules", "resolve_schedule", "train", "train_loop", "train_stage"]
