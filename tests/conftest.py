import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest
import torch

from registry_utils import shared_registries

# Two cores are shared by the suite; one intra-op thread per process is fastest for small tensors.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def registries():
    """The installed plugins' registries, built once per test run (``registry_utils.shared_registries``), for
    tests that only read them. A test that changes registries or what they are built from makes its own with
    a fresh plugin manager."""
    return shared_registries()
