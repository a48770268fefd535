"""From a config's dataset mapping to batches: building the registered dataset, and the training stream.

Exact resuming and process-count independence rest on the training stream (see
``detkit.training``): the data order is a function of (seed, sample position), and each sample's
augmentation and its anchor and RoI sampling are seeded by its position, which the loader puts in the
target as ``sample_seed``.
"""
from __future__ import annotations

import inspect
import os
from typing import Iterator

import torch

from detkit.config import ConfigError, DataConfig, check_kwargs
from detkit.data.dataset import DatasetError
from detkit.data.images import ImageReadError, to_chw_tensor

#: keyword arguments detkit hands a dataset builder; a config may not set them
RESERVED_DATASET_KEYS = ("transform", "skip_empty", "build_dataset")


def build_dataset(spec: dict | None, registries, key: str, transform=None, skip_empty: bool = False):
    """Build the dataset described by ``data.<key>`` (``{name: coco, ...builder args}``).

    A builder that accepts ``build_dataset`` receives ``build_dataset(spec, key)``, which builds a nested
    dataset mapping from the same registries (``concat``).
    """
    entry, spec = dataset_entry(spec, registries.datasets, key, "{name: coco, images: DIR, annotations: FILE}",
                                RESERVED_DATASET_KEYS)
    given = {"transform": transform, "skip_empty": skip_empty}
    if "build_dataset" in inspect.signature(entry.builder).parameters:
        given["build_dataset"] = lambda part, part_key: build_dataset(part, registries, part_key)
    check_kwargs(entry.builder, {**spec, **given}, f"data.{key}")
    return entry.builder(**spec, **given)


def with_absolute_paths(spec: dict | None, registry) -> dict | None:
    """``spec`` with the arguments its format declares as paths (registration info ``paths=("images",
    "annotations")``) made absolute, relative ones taken from the working directory, and the nested dataset
    mappings a format declares (``parts="datasets"``) likewise. Training records its data this way, so that a
    checkpoint's ``data.test`` is found from any directory. A format or value it does not know is left as it is."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or spec["name"] not in registry:
        return spec
    entry = registry.get(spec["name"])
    out = dict(spec)
    for key in entry.info.get("paths", ()):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = os.path.abspath(os.path.expanduser(out[key]))
    nested = entry.info.get("parts")
    if nested and isinstance(out.get(nested), list):
        out[nested] = [with_absolute_paths(part, registry) for part in out[nested]]
    return out


def dataset_from_path(path: str, registry, options: dict) -> dict | None:
    """The dataset mapping a bare path stands for (``detkit eval --data PATH``): the first format whose
    registration declares ``from_path=function(path, options) -> mapping | None`` and recognises ``path``;
    ``options`` are what the command was also given (``images``, ``split``, ``classes``). None: no format does."""
    for entry in registry.entries():
        recognise = entry.info.get("from_path")
        spec = recognise(path, options) if callable(recognise) else None
        if spec is not None:
            return spec
    return None


def dataset_spec(spec: str | dict, registry, images: str | None = None, split: str | None = None,
                 classes: list[str] | None = None, what: str = "--data") -> dict:
    """The dataset mapping ``spec`` names: a mapping as it is, a path a registered format recognises
    (:func:`dataset_from_path`; ``images``, ``split`` and ``classes`` go with it), or a YAML mapping in text
    (``'{name: coco, images: DIR, annotations: FILE}'``). ConfigError naming ``what`` and the forms there are."""
    import yaml

    from detkit.config import safe_load_yaml

    if isinstance(spec, dict):
        return dict(spec)
    spec = os.fspath(spec)
    found = dataset_from_path(spec, registry, {"images": images, "split": split, "classes": classes})
    if found is not None:
        return found
    try:
        data = safe_load_yaml(spec, what)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        expected = f"{path_forms(registry)} or a mapping such as '{{name: coco, images: DIR, annotations: FILE}}'"
        raise ConfigError(f"{what} {spec!r}: expected {expected}")
    return data


def path_forms(registry) -> str:
    """What a bare dataset path may be: the ``path_form`` each format with ``from_path`` declares."""
    return ", ".join(e.info.get("path_form", e.name) for e in registry.entries() if callable(e.info.get("from_path")))


def dataset_entry(spec: dict | None, registry, key: str, example: str, reserved: tuple[str, ...]):
    """The registry entry ``data.<key>`` names and the builder's keyword arguments (``spec`` without
    ``name``); ConfigError for a missing section or name and for keys detkit sets itself (``reserved``)."""
    if not spec:
        raise ConfigError(f"data.{key}: no dataset configured (expected e.g. {example}; formats: "
                          f"{', '.join(registry)})")
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"data.{key}.name: expected a registered dataset name ({', '.join(registry)}), got {name!r}")
    for word in reserved:
        if word in spec:
            raise ConfigError(f"data.{key}.{word}: set by detkit, not by the config")
    return registry.get(name), spec


def to_tensor_batch(batch) -> tuple[list[torch.Tensor], list[dict], list[torch.Tensor] | None]:
    """Collate dataset samples ``(HxWx3 uint8 array, target)`` into a batch ``(images, targets, proposals)``:
    ``(3, H, W)`` uint8 tensors, the targets, and the proposals the samples carry (a proposal cache attached
    to the dataset; ``Tensor[N_i, 4]`` in original-image pixels, after the same augmentation as the image),
    or None when they carry none."""
    images, targets, proposals = [], [], []
    for image, target in batch:
        images.append(to_chw_tensor(image))
        target = dict(target)
        proposals.append(target.pop("proposals", None))
        targets.append(target)
    return images, targets, (None if any(p is None for p in proposals) else proposals)


def build_checked_dataset(spec: dict | None, registries, key: str, transform=None, skip_empty: bool = False):
    """:func:`build_dataset`, its errors prefixed with ``data.<key>``, and :func:`check_image_files`: for a
    dataset about to be trained or evaluated on, checked before the expensive work starts."""
    try:
        dataset = build_dataset(spec, registries, key, transform=transform, skip_empty=skip_empty)
    except (DatasetError, FileNotFoundError, NotADirectoryError) as exc:
        if str(exc).startswith(f"data.{key}"):
            raise
        raise type(exc)(f"data.{key}: {exc}") from None
    check_image_files(dataset, key)
    return dataset


def check_image_files(dataset, key: str, shown: int = 5) -> None:
    """Raise DatasetError naming the first ``shown`` images of ``dataset`` (``data.<key>``) whose file is
    missing or empty (existence and size only, nothing decoded; a dataset without ``missing_image_files``,
    one that does not read image files by name, is not checked)."""
    check = getattr(dataset, "missing_image_files", None)
    missing = check() if check is not None else []
    if not missing:
        return
    listed = "; ".join(f"image id {image_id}: {path} ({reason})" for image_id, path, reason in missing[:shown])
    more = f"; and {len(missing) - shown} more" if len(missing) > shown else ""
    raise DatasetError(f"data.{key}: {len(missing)} of {len(dataset)} image files are missing or empty "
                       f"({getattr(dataset, 'source', key)}): {listed}{more}. Fix the images directory of data.{key} "
                       f"or remove those images from its annotations")


class PositionSeeded(torch.utils.data.Dataset):
    """Takes ``(index, seed)`` pairs so a sample's augmentation depends only on its stream position; the
    target gets the seed as ``sample_seed``, for the detector's anchor and RoI samplers.

    With ``skip_unreadable``, an image that cannot be read (ImageReadError) is skipped: the next of
    ``indices`` (cyclically) that can be read takes its place, with the same seed, so the batch keeps its size
    and the stream stays a function of the positions; the target lists what was skipped under
    ``"unreadable"`` (``{"image_id", "file_name", "error"}`` each) for the trainer to report and count.
    """

    def __init__(self, dataset, indices: list[int] | None = None, skip_unreadable: bool = False):
        self.dataset = dataset
        self.skip_unreadable = skip_unreadable
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self._order = {index: k for k, index in enumerate(self.indices)}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        if not self.skip_unreadable:
            image, target = self._sample(index, seed)
            return image, {**target, "sample_seed": seed}
        unreadable = []
        start = self._order.get(index, 0)
        for k in range(len(self.indices)):
            candidate = index if k == 0 else self.indices[(start + k) % len(self.indices)]
            try:
                image, target = self._sample(candidate, seed)
            except ImageReadError as exc:
                info = self.dataset.image_info(candidate)
                unreadable.append({"image_id": info["id"], "file_name": info["file_name"], "error": str(exc)})
                continue
            extra = {"unreadable": unreadable} if unreadable else {}
            return image, {**target, "sample_seed": seed, **extra}
        raise ImageReadError(f"none of the {len(self.indices)} training images could be read; the first: "
                             f"{unreadable[0]['error']}")

    def _sample(self, index: int, seed: int):
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_seed"):
            transform.set_seed(seed)
        return self.dataset[index]


class StreamBatchSampler(torch.utils.data.Sampler):
    """Infinite batches of ``(index, seed)`` from one global sample stream.

    Epoch e of the stream is a permutation drawn from ``seed`` and e; sample at
    stream position p gets augmentation seed derived from p. Each iteration
    consumes ``batch_size * world_size`` positions and rank r takes its slice,
    so N processes see exactly the samples one process with an N-times larger
    batch would see, and resuming at ``start_position`` (samples consumed so
    far) works with any number of processes.
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, start_position: int = 0,
                 rank: int = 0, world_size: int = 1, groups: list[int] | None = None):
        if not indices:
            raise ValueError("the training set has no usable images")
        self.indices = list(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.start = start_position
        self.rank = rank
        self.world_size = world_size
        # Aspect-ratio grouping: groups[k] is the group of indices[k]; every global batch is drawn from one
        # group (each epoch: shuffle, split by group, cut into global batches, shuffle the batches).
        self.groups = groups
        self.epoch_length = len(self.indices)
        if groups is not None:
            step = batch_size * world_size
            sizes = [sum(1 for g in groups if g == v) for v in sorted(set(groups))]
            self.epoch_length = sum(n // step * step for n in sizes)
            if self.epoch_length == 0:
                raise ValueError(f"no aspect-ratio group has a full batch of {step} images")

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(len(self.indices), generator=generator).tolist()
        if self.groups is None:
            return perm
        step = self.batch_size * self.world_size
        batches = []
        for value in sorted(set(self.groups)):
            members = [k for k in perm if self.groups[k] == value]
            batches += [members[i:i + step] for i in range(0, len(members) - step + 1, step)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [k for b in order for k in batches[b]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = self.epoch_length
        position = self.start
        order, order_epoch = None, -1
        while True:
            batch = []
            for p in range(position + self.rank * self.batch_size, position + (self.rank + 1) * self.batch_size):
                epoch, offset = divmod(p, n)
                if epoch != order_epoch:
                    order, order_epoch = self.epoch_order(epoch), epoch
                batch.append((self.indices[order[offset]], self.seed * 1000003 + p))
            position += self.batch_size * self.world_size
            yield batch

    def __len__(self):  # an infinite stream; DataLoader only needs this for len()
        return 2**62


def training_loader(dataset, data: DataConfig, seed: int, start_position: int = 0, rank: int = 0,
                    world_size: int = 1, pin_memory: bool = False,
                    skip_unreadable: bool = False) -> torch.utils.data.DataLoader:
    """This process's slice of the training stream of ``dataset`` from ``start_position`` on, as batches
    ``(images: list[Tensor[3, H, W] uint8], targets: list[dict])`` with each target's ``sample_seed``
    (``skip_unreadable``: see :class:`PositionSeeded`)."""
    indices = getattr(dataset, "train_indices", None) or list(range(len(dataset)))
    groups = None
    if data.group_by_aspect_ratio:
        groups = [int(dataset.image_info(i)["width"] >= dataset.image_info(i)["height"]) for i in indices]
    return torch.utils.data.DataLoader(
        PositionSeeded(dataset, indices, skip_unreadable),
        batch_sampler=StreamBatchSampler(indices, data.batch_size, seed, start_position, rank, world_size,
                                         groups),
        num_workers=data.num_workers,
        collate_fn=to_tensor_batch,
        pin_memory=pin_memory,
        # Its own generator: creating the iterator must not draw from the global RNG that a resumed
        # run restores for the samplers.
        generator=torch.Generator().manual_seed(seed),
    )
