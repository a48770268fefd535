"""RoIAlign on the CPU as a sparse matrix product.

torchvision's CPU RoIAlign kernels run on one thread, and the backward pass scatters into the
channel-strided ``(N, C, H, W)`` gradient one sample at a time: on a ResNet-50 FPN training step at
400 px with 512 RoIs per image that is about a quarter of the step. RoIAlign is linear in the feature
map, so for a given set of boxes it is one sparse matrix ``S`` of shape ``(R * P * P, N * H * W)`` whose
row for bin ``(r, i, j)`` holds the bilinear weights of that bin's samples, divided by the sample
count. With the map flattened channels-last to ``F (N * H * W, C)``:

    forward   pooled = S @ F            (R * P * P, C)
    backward  dF     = S^T @ dpooled    (N * H * W, C)

both multithreaded sparse-dense products, the backward one with ``S^T`` built by one sort of the
column indices. The weights follow torchvision's kernel exactly (sample positions, the ``[-1, size]``
validity window, the clamp at the far border, ``aligned``'s half-pixel offset, the adaptive sample
count ``ceil(bin size)`` when ``sampling_ratio <= 0``), so results agree to float rounding (checked
against torchvision in tests/ops/test_roi_align.py). Rows may hold repeated column indices (two samples in
one pixel cell); a sparse-dense product sums them, which is what the bilinear weights mean.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

#: dtypes the sparse path serves; anything else (half, bfloat16) goes to torchvision.
SPARSE_DTYPES = (torch.float32, torch.float64)


def use_sparse(features: Tensor) -> bool:
    """Whether :func:`roi_align` takes the sparse path for ``features``: a float32/64 CPU map outside
    tracing, scripting, compilation and export (whose graphs need torchvision's operator)."""
    return (features.device.type == "cpu" and features.dtype in SPARSE_DTYPES
            and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export())


def _axis_weights(start: Tensor, size: Tensor, length: int, bins: int, grid: Tensor,
                  max_grid: int) -> tuple[Tensor, Tensor]:
    """Sample rows (or columns) of one axis: for each RoI, bin and sample (``max_grid`` per bin; those
    past the RoI's own ``grid`` weigh 0), the low and high neighbour indices and their bilinear weights,
    each divided by the RoI's sample count on this axis. Returns ``(index, weight)``, both
    ``(R, bins, 2 * max_grid)``, index in ``[0, length)``."""
    bin_size = (size / bins)[:, None, None]
    g = grid.to(start.dtype)[:, None, None]
    step = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    sample = torch.arange(max_grid, dtype=start.dtype, device=start.device)[None, None, :]
    pos = start[:, None, None] + step * bin_size + (sample + 0.5) * bin_size / g.clamp(min=1)
    valid = (pos >= -1.0) & (pos <= length) & (sample < g)
    pos = pos.clamp(min=0)
    # A non-finite box (a diverged proposal) weighs 0 (valid is false) and its index is kept in range.
    low = torch.nan_to_num(pos.floor(), nan=0.0, posinf=length - 1).to(torch.int64).clamp(0, length - 1)
    at_edge = low >= length - 1
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    scale = valid.to(pos.dtype) / g.clamp(min=1)
    index = torch.stack([low, high], -1).flatten(2)
    weight = torch.stack([(1 - frac) * scale, frac * scale], -1).flatten(2)
    return index, weight


def sampling_matrix(rois: Tensor, shape: tuple[int, int, int], output_size: tuple[int, int],
                    spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign of ``rois (R, 5)`` (batch index, x1, y1, x2, y2) over maps of ``shape = (N, H, W)`` as a
    sparse CSR matrix ``(R * P_h * P_w, N * H * W)``; rows ordered RoI, bin row, bin column."""
    n, h, w = shape
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    rw, rh = rois[:, 3] * spatial_scale - offset - x1, rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # torchvision's legacy mode forces RoIs to at least one cell
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gy = gx = torch.full_like(rw, sampling_ratio, dtype=torch.int64)
        my = mx = sampling_ratio
    else:  # adaptive: ceil(bin size) samples; padded to the largest, the padding weighs 0
        gy, gx = torch.ceil(rh / ph).to(torch.int64), torch.ceil(rw / pw).to(torch.int64)
        my = max(int(gy.max()), 1) if len(rois) else 1
        mx = max(int(gx.max()), 1) if len(rois) else 1
    yi, yw = _axis_weights(y1, rh, h, ph, gy, my)
    xi, xw = _axis_weights(x1, rw, w, pw, gx, mx)
    r, ky, kx = len(rois), yi.shape[-1], xi.shape[-1]
    base = rois[:, 0].to(torch.int64).view(r, 1, 1, 1, 1) * (h * w)
    col = base + yi.view(r, ph, 1, ky, 1) * w + xi.view(r, 1, pw, 1, kx)
    val = yw.view(r, ph, 1, ky, 1) * xw.view(r, 1, pw, 1, kx)
    crow = torch.arange(r * ph * pw + 1, device=rois.device) * (ky * kx)
    return _csr(crow, col.reshape(-1), val.reshape(-1), (r * ph * pw, n * h * w))


def _csr(crow: Tensor, col: Tensor, val: Tensor, size: tuple[int, int]) -> Tensor:
    # torch warns once that CSR support is "in beta"; the two products used here are long stable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size, check_invariants=False)


def transpose_csr(matrix: Tensor) -> Tensor:
    """``matrix.T`` as a CSR matrix (one sort of the column indices), for the backward product."""
    rows, cols = matrix.shape
    crow, col, val = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    order = torch.argsort(col)
    row = torch.repeat_interleave(torch.arange(rows, device=col.device), crow.diff())
    counts = torch.bincount(col, minlength=cols)
    crow_t = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return _csr(crow_t, row[order], val[order], (cols, rows))


def _channels_last_rows(x: Tensor) -> Tensor:
    """``(N, C, H, W)`` as ``(N * H * W, C)`` (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _SparseRoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> Tensor:
        n, c, h, w = features.shape
        matrix = sampling_matrix(rois.to(features.dtype), (n, h, w), output_size, spatial_scale,
                                 sampling_ratio, aligned)
        ctx.matrix, ctx.shape = matrix, features.shape
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the product to bfloat16
            pooled = (matrix @ _channels_last_rows(features)).view(len(rois), *output_size, c)
        return pooled.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        n, c, h, w = ctx.shape
        with torch.autocast("cpu", enabled=False):
            grad_rows = transpose_csr(ctx.matrix) @ _channels_last_rows(grad.to(ctx.matrix.dtype))
        grad_features = grad_rows.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()
        return grad_features, None, None, None, None, None


def as_rois(boxes: Tensor | list[Tensor], like: Tensor) -> Tensor:
    """torchvision's box argument (``(K, 5)`` rows, or xyxy per image) as ``(K, 5)`` rows (batch index,
    x1, y1, x2, y2); ``like`` gives the dtype and device when there are no images."""
    if isinstance(boxes, Tensor):
        return boxes
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)]
                     or [like.new_zeros((0, 5))])


def roi_align(features: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` (same arguments and result), by the sparse product on the CPU
    (:func:`use_sparse`), by torchvision's kernel elsewhere."""
    if not use_sparse(features):
        return tv_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = as_rois(boxes, features)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_align: boxes must be (K, 5) rows or a list of (K_i, 4), got {tuple(rois.shape)}")
    return _SparseRoIAlign.apply(features, rois.detach(), size, float(spatial_scale), int(sampling_ratio),
                                 bool(aligned))
