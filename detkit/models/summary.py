"""Per-layer tables of parameters, operations and output volume (``detkit summary``).

The counting convention is the reference notes': a convolution or fully connected
layer costs one multiply-add per weight per output position plus one add per
bias (AlexNet conv1: 55*55*96*(11*11*3+1) = 105,705,600); a pooling layer one
operation per input element, a normalisation layer (LRN, batch norm) one per
element. Activations, dropout and reshapes cost nothing and get no row (the
notes fold the ReLUs into the layer they follow); a layer with parameters but no
arithmetic of its own (a PReLU) gets a row with 0 operations. The notes' last row,
the softmax, has no row here: the models return logits and the softmax belongs
to the loss (the notes also count it inconsistently, 0 operations for the small
CNN and one per class for LeNet-5, AlexNet and VGG-16). The multiply-adds of
convolutions and fully connected layers without the bias term (``total_macs``)
are what the ResNet paper calls FLOPs (ResNet-50: 3.8 x 10^9) and the PReLU paper
"complexity (ops.)" (model A: 1.90 x 10^10).

A model built on the meta device (``with torch.device("meta")``) is summarised
without allocating weights or computing anything: only shapes flow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

_FREE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
         nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Identity, nn.Softmax)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NORMS = (nn.LocalResponseNorm, nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class LayerRow:
    """One table row: a leaf layer's qualified name, its type in the notes' notation, the per-sample
    output shape, its parameters, operations (multiply-adds + bias adds) and bias-free multiply-adds."""

    name: str
    type: str
    output: tuple[int, ...]  # per-sample output shape (C, H, W) or (F,)
    params: int
    ops: int
    macs: int = 0  # conv/fc multiply-adds without bias

    @property
    def volume(self) -> int:
        return math.prod(self.output)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def describe(module: nn.Module) -> str:
    """The notes' notation: ``conv(11, 96, s4)``, ``conv(3, 64, p1)``, ``pool(3, 2)``, ``avg(2)``, ``fc(4096)``."""
    if isinstance(module, nn.Conv2d):
        k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        parts = [str(k[0]) if k[0] == k[1] else f"{k[0]}x{k[1]}", str(module.out_channels)]
        if s != (1, 1):
            parts.append(f"s{s[0]}" if s[0] == s[1] else f"s{s[0]}x{s[1]}")
        if p != (0, 0):
            parts.append(f"p{p[0]}" if p[0] == p[1] else f"p{p[0]}x{p[1]}")
        if module.groups > 1:
            parts.append(f"g{module.groups}")
        return f"conv({', '.join(parts)})"
    if isinstance(module, nn.Linear):
        return f"fc({module.out_features})"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        word = "pool" if isinstance(module, nn.MaxPool2d) else "avg"
        k, s = _pair(module.kernel_size)[0], _pair(module.stride or module.kernel_size)[0]
        return f"{word}({k})" if k == s else f"{word}({k}, {s})"
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return "global avg" if isinstance(module, nn.AdaptiveAvgPool2d) else "global max"
    if isinstance(module, nn.LocalResponseNorm):
        return "norm"
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    return type(module).__name__


def _cost(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> tuple[int, int] | None:
    """(ops, macs) per sample, or None for a layer that gets no row."""
    per_in = inp[0].numel()
    per_out = out[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = _pair(module.kernel_size)
        fan_in = kh * kw * module.in_channels // module.groups
        macs = per_out * fan_in
        return macs + (per_out if module.bias is not None else 0), macs
    if isinstance(module, nn.Linear):
        macs = per_out * module.in_features
        return macs + (per_out if module.bias is not None else 0), macs
    if isinstance(module, _POOLS):
        if inp.shape == out.shape:  # an adaptive pool that changes nothing
            return None
        return per_in, 0
    if isinstance(module, _NORMS):
        return per_out, 0
    if isinstance(module, _FREE):
        return None
    return (0, 0) if any(True for _ in module.parameters(recurse=False)) else None


@torch.no_grad()
def summarize(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerRow]:
    """Run one zero image ``(1, C, H, W)`` through ``model`` (eval mode, on the device of its parameters)
    and tabulate its leaf layers in the order they run.

    A module run twice counts its parameters once; parameters of modules that eval mode never runs
    (auxiliary classifiers) are gathered in a last row so the parameter total is the model's.
    """
    if len(input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in input_size):
        raise ValueError(f"input size {tuple(input_size)}: expected three positive integers C, H, W")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    rows: list[LayerRow] = []
    seen: set[int] = set()
    hooks = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, output):
        if not args or not torch.is_tensor(args[0]) or not torch.is_tensor(output):
            return
        cost = _cost(module, args[0], output)
        if cost is None:
            return
        params = sum(p.numel() for p in module.parameters(recurse=False)) if id(module) not in seen else 0
        seen.add(id(module))  # a module run twice (shared weights) counts its parameters once
        rows.append(LayerRow(names[module], describe(module), tuple(output.shape[1:]), params, cost[0], cost[1]))

    for module in model.modules():
        leaf = not any(True for _ in module.children())
        if leaf or any(True for _ in module.parameters(recurse=False)):
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    counted = {id(p) for m in model.modules() if id(m) in seen for p in m.parameters(recurse=False)}
    unused = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    if unused:  # e.g. auxiliary classifiers that eval mode skips
        rows.append(LayerRow("(not run at inference)", "-", (0,), unused, 0, 0))
    return rows


def _fmt(n: int) -> str:
    return f"{n:,}"


def total_macs(rows: list[LayerRow]) -> int:
    """Multiply-adds of the convolution and fully connected weights (no bias): the ResNet paper's FLOPs."""
    return sum(r.macs for r in rows)


def totals(rows: list[LayerRow]) -> dict[str, int]:
    """Sums over the rows: ``params``, ``ops``, ``macs`` and ``volume`` (output values of all layers)."""
    return {"params": sum(r.params for r in rows), "ops": sum(r.ops for r in rows), "macs": total_macs(rows),
            "volume": sum(r.volume for r in rows)}


def format_summary(rows: list[LayerRow], title: str, input_size: tuple[int, int, int] | None = None) -> str:
    """The notes' table (layer, type, parameters, operations, volume as H x W x C) with totals; with
    ``input_size`` the first row is the input, as in the notes."""
    header = ("layer", "type", "parameters", "operations", "volume")
    table = []
    if input_size is not None:
        c, h, w = input_size
        table.append(("input", f"input({h}, {c})", "0", "0", f"{h} x {w} x {c}"))
    for r in rows:
        shape = r.output
        volume = (f"{shape[1]} x {shape[2]} x {shape[0]}" if len(shape) == 3 else _fmt(r.volume)) if r.volume else "-"
        table.append((r.name, r.type, _fmt(r.params), _fmt(r.ops), volume))
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(5)]
    align = ["<", "<", ">", ">", ">"]
    line = lambda row: "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(row, align, widths))  # noqa: E731
    t = totals(rows)
    out = [title, line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in table]
    out += ["", f"total parameters: {t['params']:,}", f"total operations: {t['ops']:,}",
            f"multiply-adds (conv/fc weights, the ResNet paper's FLOPs): {t['macs']:,} ({t['macs'] / 1e9:.2f} x 10^9)",
            f"total output volume: {t['volume']:,} values"]
    return "\n".join(out)


def summary_command(registries, name: str, input_size: tuple[int, int, int] | None = None) -> str:
    """The table ``detkit summary NAME`` prints, at ``input_size`` or the backbone's default size."""
    # Shapes are all the table needs: build on the meta device, so a 300M-parameter model costs nothing.
    with torch.device("meta"):
        model = registries.backbones.build(name)
    size = tuple(input_size) if input_size else tuple(model.defaults.input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input size {size}: expected C,H,W")
    try:
        rows = summarize(model, size)
    except RuntimeError as exc:
        raise ValueError(f"{name} cannot run on a {size[1]}x{size[2]} input: {str(exc).splitlines()[0]}") from None
    return format_summary(rows, f"{name} at {size[0]}x{size[1]}x{size[2]}", size)
