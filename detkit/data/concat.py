"""Concatenated datasets (the papers' "07+12": VOC 2007 trainval + VOC 2012 trainval).

The parts must share their class list; image ids are renumbered 1..N in order so they stay unique.
"""
from __future__ import annotations

import copy

from detkit.data.dataset import DatasetError, DetectionDataset


class ConcatDataset(DetectionDataset):
    def __init__(self, parts: list[DetectionDataset], transform=None, skip_empty: bool = False):
        if not parts:
            raise DatasetError("concat: 'datasets' is empty")
        first = parts[0]
        for k, part in enumerate(parts[1:], 1):
            if list(part.class_names) != list(first.class_names) or list(part.cat_ids) != list(first.cat_ids):
                raise DatasetError(f"concat: dataset {k} ({part.source}) has classes {list(part.class_names)}, "
                                   f"dataset 0 ({first.source}) has {list(first.class_names)}")
        records = []
        for part in parts:
            for r in part.records:
                r = copy.copy(r)
                r.id = len(records) + 1
                records.append(r)
        source = " + ".join(p.source for p in parts)
        super().__init__(records, first.class_names, first.cat_ids, source, transform, skip_empty)
