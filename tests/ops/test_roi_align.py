"""detkit's CPU RoIAlign (a sparse matrix product, detkit/ops/sparse_roi_align.py) against torchvision's
kernel: the same pooled values and the same feature gradients, for every sampling mode and box edge case."""
from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from detkit.ops import RoIAlignExtractor
from detkit.ops.sparse_roi_align import roi_align, sampling_matrix, transpose_csr, use_sparse

N, C, H, W = 2, 3, 13, 17


def _boxes(dtype=torch.float64) -> torch.Tensor:
    """Random boxes on an 8-pixel-stride map of H x W cells, with the edge cases: zero-size boxes, a box
    wholly outside the map, one covering it, one crossing its far corner."""
    g = torch.Generator().manual_seed(0)
    r = 120
    xy = torch.rand(r, 2, generator=g) * torch.tensor([W * 8.0, H * 8.0]) - 20
    wh = torch.rand(r, 2, generator=g) * 60
    wh[:6] = 0
    boxes = torch.cat([torch.randint(0, N, (r, 1), generator=g).float(), xy, xy + wh], 1)
    boxes[6] = torch.tensor([0, -50, -50, -30, -30.0])
    boxes[7] = torch.tensor([1, 0, 0, W * 8, H * 8.0])
    boxes[8] = torch.tensor([1, W * 8 - 3, H * 8 - 3, W * 8 + 30, H * 8 + 30.0])
    return boxes.to(dtype)


@pytest.mark.parametrize("output_size,sampling_ratio,aligned,scale",
                         list(itertools.product([(7, 7), (3, 5)], [2, 1, 0, -1], [True, False], [0.125, 0.25])))
def test_matches_torchvision_forward_and_backward(output_size, sampling_ratio, aligned, scale):
    features = torch.randn(N, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    boxes = _boxes()
    ours, theirs = features.clone().requires_grad_(), features.clone().requires_grad_()
    a = roi_align(ours, boxes, output_size, scale, sampling_ratio, aligned)
    b = tv_roi_align(theirs, boxes, output_size, scale, sampling_ratio, aligned)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    grad = torch.randn_like(b)
    a.backward(grad)
    b.backward(grad)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-12)


def test_float32_lists_channels_last_and_empty():
    features = torch.randn(N, C, H, W)
    boxes = [torch.tensor([[1.0, 2, 30, 40], [5, 5, 90, 60]]), torch.zeros(0, 4)]
    want = tv_roi_align(features, boxes, 7, 0.125, 2, True)
    torch.testing.assert_close(roi_align(features, boxes, 7, 0.125, 2, True), want, rtol=0, atol=1e-5)
    cl = features.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_align(cl, boxes, 7, 0.125, 2, True), want, rtol=0, atol=1e-5)
    empty = features.clone().requires_grad_()
    out = roi_align(empty, [torch.zeros(0, 4), torch.zeros(0, 4)], 7, 0.125, 2, True)
    assert out.shape == (0, C, 7, 7)
    out.sum().backward()
    assert empty.grad is not None and not empty.grad.any()


def test_other_dtypes_and_tracing_use_torchvision():
    features = torch.randn(N, C, H, W)
    assert use_sparse(features) and not use_sparse(features.bfloat16())
    boxes = _boxes(torch.float32)
    traced = torch.jit.trace(lambda f, b: roi_align(f, b, 7, 0.125, 2, True), (features, boxes))
    assert "roi_align" in str(traced.graph) and "sparse" not in str(traced.graph)


def test_sampling_matrix_and_its_transpose():
    boxes = _boxes(torch.float32)[:10]
    matrix = sampling_matrix(boxes, (N, H, W), (7, 7), 0.125, 2, True)
    assert matrix.shape == (10 * 49, N * H * W) and matrix.layout == torch.sparse_csr
    # Every bin of a box inside the map averages its samples: its weights sum to 1.
    inside = (boxes[:, 1:] >= 0).all(1) & (boxes[:, 3] <= W * 8) & (boxes[:, 4] <= H * 8)
    sums = matrix.to_dense().sum(1).view(10, 49)
    torch.testing.assert_close(sums[inside], torch.ones_like(sums[inside]))
    torch.testing.assert_close(transpose_csr(matrix).to_dense(), matrix.to_dense().T)


def test_extractor_kernel_switch():
    features = [torch.randn(1, C, 40, 40), torch.randn(1, C, 20, 20)]
    proposals = [torch.tensor([[0.0, 0, 30, 30], [10, 10, 150, 140], [3, 4, 20, 9]])]
    sparse = RoIAlignExtractor(7, [4, 8], 2, True, cpu_sparse=True)
    plain = RoIAlignExtractor(7, [4, 8], 2, True, cpu_sparse=False)
    torch.testing.assert_close(sparse(features, proposals), plain(features, proposals), rtol=0, atol=1e-5)


def test_under_cpu_autocast_the_product_stays_float32():
    features = torch.randn(N, C, H, W, requires_grad=True)
    boxes = _boxes(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(features, boxes, 7, 0.125, 2, True)
    assert out.dtype == torch.float32
    out.sum().backward()
    torch.testing.assert_close(out, tv_roi_align(features, boxes, 7, 0.125, 2, True), rtol=0, atol=1e-5)
