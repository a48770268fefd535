"""Truncated SVD of fully connected layers (Fast R-CNN, Girshick 2015, Sec. 3.1).

A ``u x v`` weight matrix ``W`` is approximated by ``U_t S_t V_t^T`` from its top
``t`` singular values, and the layer is replaced by two layers without a
non-linearity between them: the first has weights ``S_t V_t^T`` and no bias,
the second ``U_t`` and the original bias. Parameters and multiply-adds drop
from ``uv`` to ``t(u + v)``. The paper compresses VGG-16's fc6 to its top 1024
and fc7 to its top 256 singular values at test time.
"""
from __future__ import annotations

import torch
from torch import nn

PAPER_RANKS = (1024, 256)  # fc6, fc7 of VGG-16 (Fast R-CNN Sec. 3.1)


def truncated_svd(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``layer`` (``in -> out``) as ``Linear(in, rank, bias=False) -> Linear(rank, out)``; a rank that does not
    reduce the parameter count is refused."""
    out_f, in_f = layer.weight.shape
    if not 0 < rank < min(out_f, in_f):
        raise ValueError(f"truncated SVD rank {rank}: expected 0 < rank < {min(out_f, in_f)} for a "
                         f"{in_f} -> {out_f} layer")
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    first = nn.Linear(in_f, rank, bias=False)
    second = nn.Linear(rank, out_f, bias=layer.bias is not None)
    dtype, device = layer.weight.dtype, layer.weight.device
    first.weight.data = (s[:rank, None] * vh[:rank]).to(dtype).to(device)
    second.weight.data = u[:, :rank].contiguous().to(dtype).to(device)
    if layer.bias is not None:
        second.bias.data = layer.bias.detach().clone()
    return nn.Sequential(first, second)


def compress_fully_connected(module: nn.Module, ranks: list[int] | tuple[int, ...] = PAPER_RANKS) -> list[str]:
    """Replace the first ``len(ranks)`` ``nn.Linear`` layers below ``module`` (in definition order: fc6, fc7
    of a VGG or AlexNet RoI head) by their truncated SVDs, in place. Returns the names of the layers replaced."""
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < len(ranks):
        raise ValueError(f"--svd: {len(ranks)} ranks given but the RoI head has only {len(linears)} fully "
                         f"connected layers ({', '.join(n for n, _ in linears) or 'none'})")
    replaced = []
    for (name, layer), rank in zip(linears, ranks):
        parent = module
        *path, leaf = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        setattr(parent, leaf, truncated_svd(layer, int(rank)))
        replaced.append(f"{name} ({layer.in_features}x{layer.out_features} -> rank {rank})")
    return replaced
