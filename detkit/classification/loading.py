"""From ``data.train`` / ``data.test`` of a classifier config to batches.

Training batches come from the same seeded sample stream as detection (:class:`StreamBatchSampler` and
:class:`PositionSeeded`: the order is a function of (seed, stream position), each sample's augmentation of its
position, unreadable images replaced by the next one and reported), collated into one uint8 tensor
``(B, 3, S, S)`` and the labels ``(B,)``.
"""
from __future__ import annotations

import numpy as np
import torch

from detkit.config import check_kwargs
from detkit.data.dataset import DatasetError
from detkit.data.loading import PositionSeeded, StreamBatchSampler, check_image_files, dataset_entry


def build_classification_dataset(spec: dict | None, registries, key: str, transform=None):
    """The dataset ``data.<key>`` describes (``{name: image_folder, root: DIR}``), its image files checked
    (missing or empty ones named) before any training starts."""
    entry, spec = dataset_entry(spec, registries.classification_datasets, key, "{name: image_folder, root: DIR}",
                                ("transform",))
    check_kwargs(entry.builder, {**spec, "transform": transform}, f"data.{key}")
    try:
        dataset = entry.builder(**spec, transform=transform)
    except (DatasetError, FileNotFoundError, NotADirectoryError) as exc:
        raise type(exc)(f"data.{key}: {exc}") from None
    check_image_files(dataset, key)
    return dataset


def collate(batch) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Samples ``(image (S, S, 3) uint8 [or (10, S, S, 3)], {"label", ...})`` -> ``(images (B, 3, S, S)
    uint8 [(B, 10, 3, S, S)], labels (B,), unreadable records)``."""
    # Contiguous (B, 3, S, S) (the copy is made in the worker): a plain movedim view would be channels-last in
    # memory and change the convolutions' layout behind train.channels_last's back.
    images = torch.from_numpy(np.stack([image for image, _ in batch])).movedim(-1, -3).contiguous()
    labels = torch.tensor([target["label"] for _, target in batch], dtype=torch.int64)
    unreadable = [r for _, target in batch for r in target.get("unreadable", ())]
    return images, labels, unreadable


def training_batches(dataset, data, seed: int, start_position: int, rank: int, world_size: int,
                     pin_memory: bool) -> torch.utils.data.DataLoader:
    """This process's slice of the training stream from ``start_position`` on (see the module doc)."""
    indices = list(range(len(dataset)))
    return torch.utils.data.DataLoader(
        PositionSeeded(dataset, indices, skip_unreadable=True),
        batch_sampler=StreamBatchSampler(indices, data.batch_size, seed, start_position, rank, world_size),
        num_workers=data.num_workers, collate_fn=collate, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),  # not the global RNG a resumed run restores
    )


def test_batches(dataset, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """The dataset in order (its transform: the test view or the ten crops)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate)
