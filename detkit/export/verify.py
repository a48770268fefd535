"""Checking an exported detector against the eager one it came from.

Each verification image goes through the eager detector alone (a batch of one: in a mixed-size batch the
eager detector pads the images to one size, which changes features at the borders) and through the
exported file, first alone and then, for images of one size, as one batch. Detections match when every
eager detection has an exported one of the same label within ``tolerance`` pixels on every coordinate
(nearest first, one to one) and the counts agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Comparison:
    """One image: detection counts, the largest coordinate and score differences over matched pairs, and
    how many eager detections found no exported partner within the tolerance."""

    name: str
    eager: int
    exported: int
    box_diff: float
    score_diff: float
    unmatched: int

    @property
    def ok(self) -> bool:
        return self.unmatched == 0 and self.eager == self.exported


def compare(name: str, eager: dict, exported: dict, tolerance: float) -> Comparison:
    """Match ``exported`` detections to ``eager`` ones (same label, nearest box, one to one)."""
    e_boxes, x_boxes = eager["boxes"].float().cpu(), exported["boxes"].float().cpu()
    if len(e_boxes) == 0 or len(x_boxes) == 0:
        return Comparison(name, len(e_boxes), len(x_boxes), 0.0, 0.0, len(e_boxes))
    diff = (e_boxes[:, None, :] - x_boxes[None, :, :]).abs().amax(dim=2)
    diff[eager["labels"].cpu()[:, None] != exported["labels"].cpu()[None, :]] = float("inf")
    nearest = diff.argmin(dim=1)
    distance = diff.gather(1, nearest[:, None]).squeeze(1)
    matched = distance <= tolerance
    # one to one: an exported detection claimed twice counts once
    unmatched = int((~matched).sum()) + int(matched.sum()) - int(torch.unique(nearest[matched]).numel())
    score = (eager["scores"].cpu()[matched] - exported["scores"].cpu()[nearest[matched]]).abs()
    finite = distance[torch.isfinite(distance)]
    return Comparison(name, len(e_boxes), len(x_boxes), float(finite.max()) if finite.numel() else float("inf"),
                      float(score.max()) if score.numel() else 0.0, unmatched)


@torch.no_grad()
def verify(model, exported, images: list[tuple[str, Tensor]], tolerance: float) -> list[Comparison]:
    """Comparisons of every image alone, then of each group of two or more same-sized images as a batch
    (named ``name[batch]``)."""
    eager = [model([image])[0] for _, image in images]
    rows = [compare(os.path.basename(name), ref, exported([image])[0], tolerance)
            for (name, image), ref in zip(images, eager)]
    sizes: dict[tuple, list[int]] = {}
    for i, (_, image) in enumerate(images):
        sizes.setdefault(tuple(image.shape), []).append(i)
    for group in (g for g in sizes.values() if len(g) > 1):
        batched = exported([images[i][1] for i in group])
        rows.extend(compare(f"{os.path.basename(images[i][0])} (batch of {len(group)})", eager[i], out, tolerance)
                    for i, out in zip(group, batched))
    return rows


def format_comparisons(rows: list[Comparison], tolerance: float) -> str:
    lines = [f"{'image':40s} {'eager':>6s} {'export':>6s} {'max |box| px':>12s} {'max |score|':>11s}  match"]
    for r in rows:
        lines.append(f"{r.name[-40:]:40s} {r.eager:6d} {r.exported:6d} {r.box_diff:12.2e} {r.score_diff:11.2e}  "
                     f"{'yes' if r.ok else f'NO ({r.unmatched} unmatched)'}")
    boxes = max((r.box_diff for r in rows), default=0.0)
    scores = max((r.score_diff for r in rows), default=0.0)
    bad = sum(not r.ok for r in rows)
    lines.append(f"largest box difference {boxes:.2e} px, largest score difference {scores:.2e}; "
                 f"{len(rows) - bad} of {len(rows)} comparisons match (same labels, boxes within {tolerance:g} px)")
    return "\n".join(lines)
