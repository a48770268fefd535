"""Anchors of the Region Proposal Network (Faster R-CNN Sec. 3.1.1).

At every position of a feature map of stride s, k = |scales| x |ratios| anchors
are centred on the receptive-field centre; the paper's default is 3 scales
(128^2, 256^2, 512^2 pixel areas) x 3 aspect ratios (1:2, 1:1, 2:1) at s = 16.
"""
from __future__ import annotations

import torch
from torch import Tensor


class AnchorGenerator:
    """Generates anchors ``(H*W*A, 4)`` xyxy for a feature map, position-major.

    The order matches an RPN head whose outputs are laid out ``(A, H, W)`` per
    image and permuted to ``(H, W, A)``.
    """

    def __init__(self, sizes: list[float] = (128.0, 256.0, 512.0), aspect_ratios: list[float] = (0.5, 1.0, 2.0),
                 stride: int = 16, offset: float = 0.5, round_cells: bool = False):
        if not sizes or not aspect_ratios:
            raise ValueError("anchor sizes and aspect_ratios must not be empty")
        if any(s <= 0 for s in sizes) or any(r <= 0 for r in aspect_ratios):
            raise ValueError(f"anchor sizes {list(sizes)} and aspect ratios {list(aspect_ratios)} must be positive")
        self.sizes = [float(s) for s in sizes]
        self.aspect_ratios = [float(r) for r in aspect_ratios]
        self.stride = int(stride)
        self.offset = float(offset)  # anchor centres at (i + offset) * stride: 0.5 the cell centre, 0 its corner
        self.round_cells = bool(round_cells)  # torchvision rounds the cell anchors to whole pixels
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.sizes) * len(self.aspect_ratios)

    def cell_anchors(self, dtype=torch.float32, device=None) -> Tensor:
        """``(A, 4)`` anchors centred on (0, 0); ratio = height / width, area = size^2."""
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        ratios = torch.tensor(self.aspect_ratios, dtype=torch.float64)
        h_ratio = torch.sqrt(ratios)
        w_ratio = 1.0 / h_ratio
        ws = (w_ratio[:, None] * sizes[None, :]).reshape(-1)
        hs = (h_ratio[:, None] * sizes[None, :]).reshape(-1)
        cells = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return (cells.round() if self.round_cells else cells).to(dtype=dtype, device=device)

    def grid_anchors(self, feature_size: tuple[int, int], dtype=torch.float32, device=None) -> Tensor:
        key = (tuple(feature_size), dtype, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        h, w = feature_size
        anchors = shifted_anchors(self.cell_anchors(torch.float32, device), h, w, float(self.stride),
                                  self.offset).to(dtype)
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors


def shifted_anchors(cells: Tensor, h: int, w: int, stride: float, offset: float) -> Tensor:
    """The cell anchors ``cells (A, 4)`` (float32, centred on 0) at every position of an ``h x w`` map of
    ``stride``: ``(h * w * A, 4)``, position-major, centres at ``(i + offset) * stride`` (0.5: the centre of each
    stride cell). A free function of sizes (TorchScript compiles it in ``detkit export``'s graph)."""
    shifts_x = (torch.arange(w, dtype=torch.float32, device=cells.device) + offset) * stride
    shifts_y = (torch.arange(h, dtype=torch.float32, device=cells.device) + offset) * stride
    sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    return (shifts + cells[None]).reshape(-1, 4)
