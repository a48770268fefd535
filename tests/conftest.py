import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest
import torch

# Two cores are shared by the suite; one intra-op thread per process is fastest for small tensors.
torch.set_num_threads(1)


@pytest.fixture
def registries():
    """A fresh plugin manager and registries per test (no global state)."""
    from detkit.plugins import get_registries

    return get_registries()
