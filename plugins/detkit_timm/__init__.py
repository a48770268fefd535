"""detkit backbone plugin: every timm model as a detection backbone, when timm is installed.

timm is not a dependency. When it is importable, each name of ``timm.list_models()`` is registered as
``timm/<name>``; nothing is built until a config asks for the name. The classifier is
``timm.create_model(name, pretrained=False, num_classes=...)``. Weights come only from local files: either
``pretrained_file`` (handed to timm as ``pretrained_cfg_overlay=dict(file=...)``, so timm adapts the
classifier and input layers as it does for its own checkpoints) or detkit's ``model.backbone.weights``
(a timm state dict; keys are prefixed with ``model.`` on loading). Nothing is downloaded.

Detection cut, from the model's ``feature_info`` (channels, reduction, module per feature map): the trunk
ends at the deepest feature map of stride 16 (the deepest of stride <= 16 if the model has none of exactly
16), as ResNet-C4 does. Two cases:

- *Sequential models* (most CNNs: ResNet, EfficientNet, ConvNeXt, RegNet, ...). Following timm's own
  ``FeatureListNet`` rule, the model's children (an nn.Sequential flattened one level when the feature
  modules are named inside it) are taken as its forward order. The trunk is those modules up to the cut
  feature's module, grouped into stages at the feature modules; the RoI head is the remaining modules up
  to the classifier and the model's own ``forward_head(x, pre_logits=True)`` (global pooling and any
  pre-logits layers), so the RoI head is the rest of the pretrained network. RoIs are pooled to 7 * (last reduction / cut reduction), 14 for the
  usual stride-32 models, so the last stage sees 7x7 maps as at 224x224. The order assumption is checked
  once at construction (one forward pass at the model's input size, at most 224x224) in eval mode: running the modules in order and then
  ``forward_head`` must reproduce ``model(x)``, and the cut module's output must be an NCHW map with the
  declared channels; otherwise the model is treated as the second case.
- *Other models* (vision transformers, NHWC outputs, models whose forward is not a chain of children).
  The trunk runs ``model.forward_intermediates(x, indices=[cut], intermediates_only=True, stop_early=True)``
  (sharing the model's parameters; the whole model is then a submodule of the trunk, so its unused
  classifier parameters travel with it), and, since the rest of such a network is not expressible as a
  module on pooled regions, the RoI head is a new 3x3 convolution (cut channels -> cut channels), ReLU and
  global average pooling on 7x7 RoIs. No stages are exposed (``freeze_at`` must be 0).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from detkit.backbones import (IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneDefaults, DetectionParts, FeatureInfo,
                              FeatureStages)
from detkit.hookspecs import hookimpl

PREFIX = "timm/"
#: the largest side used for the construction-time check of the module order (cost, not correctness)
CHECK_SIDE = 224


def feature_infos(model: nn.Module, name: str) -> list[dict]:
    """The model's feature maps as ``[{"num_chs", "reduction", "module"}, ...]``, shallow to deep.

    Accepts both forms timm uses: a list of dicts (classification models) and a ``FeatureInfo`` object
    (``channels()``, ``reduction()``, ``module_name()``; features-only models).
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(f"{PREFIX}{name}: the timm model has no feature_info, so it cannot be cut for detection")
    if hasattr(info, "channels") and hasattr(info, "reduction") and hasattr(info, "module_name"):
        idx = list(range(len(info)))
        return [dict(num_chs=int(c), reduction=int(r), module=str(m))
                for c, r, m in zip(info.channels(idx), info.reduction(idx), info.module_name(idx))]
    out = []
    for i, f in enumerate(info):
        missing = [k for k in ("num_chs", "reduction", "module") if k not in f]
        if missing:
            raise ValueError(f"{PREFIX}{name}: feature_info[{i}] lacks {missing} (has {sorted(f)})")
        out.append(dict(num_chs=int(f["num_chs"]), reduction=int(f["reduction"]), module=str(f["module"])))
    if not out:
        raise ValueError(f"{PREFIX}{name}: the timm model's feature_info is empty")
    return out


def cut_index(features: list[dict], name: str) -> int:
    """Index of the deepest feature map of stride 16, else of the deepest one of stride <= 16."""
    exact = [i for i, f in enumerate(features) if f["reduction"] == 16]
    if exact:
        return exact[-1]
    usable = [i for i, f in enumerate(features) if f["reduction"] <= 16]
    if not usable:
        raise ValueError(f"{PREFIX}{name}: no feature map of stride <= 16 "
                         f"(reductions {[f['reduction'] for f in features]})")
    return usable[-1]


def module_list(model: nn.Module, feature_modules: list[str]) -> list[tuple[str, nn.Module]]:
    """The model's children in registration order as ``(dotted name, module)``; an nn.Sequential child is
    flattened one level when feature modules are named inside it (``stages.2``), as timm's
    ``_module_list(flatten_sequential=True)`` does for such models, and kept whole otherwise (``layer3``)."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and any(f.startswith(f"{name}.") for f in feature_modules):
            out += [(f"{name}.{n}", m) for n, m in child.named_children()]
        else:
            out.append((name, child))
    return out


class PreLogits(nn.Module):
    """``model.forward_head(x, pre_logits=True)``: (R, C, h, w) -> (R, head_channels).

    tail: the modules ``forward_head`` uses, registered here so their parameters belong to the RoI head;
    the model itself is held without registering it (its other parameters belong elsewhere).
    """

    def __init__(self, model: nn.Module, tail: list[nn.Module]):
        super().__init__()
        self.tail = nn.ModuleList(tail)
        self._model = [model]

    def forward(self, x: Tensor) -> Tensor:
        return self._model[0].forward_head(x, pre_logits=True).flatten(1)


class IntermediatesTrunk(nn.Module):
    """images (B, 3, H, W) -> feature map ``index`` of ``model.forward_intermediates``, (B, C, H/s, W/s)."""

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True,
                                                stop_early=True)[0]


class TimmBackbone(Backbone):
    """A timm classifier: images (B, 3, H, W) -> logits (B, num_classes), cut for detection as described
    in the module docstring. ``name`` is the timm model name (without the ``timm/`` prefix)."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.timm_name = name
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
        self.features = feature_infos(model, name)
        self.cut = cut_index(self.features, name)
        self.out_channels = self.features[self.cut]["num_chs"]
        self.stride = self.features[self.cut]["reduction"]
        plan = self._sequential_plan(input_size)
        if plan is not None:
            # plain lists, not submodules: these modules are already registered under ``model.``
            self.stage_modules, self.head_modules, self.tail_modules, self.head_channels = plan
            roi = 7 * max(1, self.features[-1]["reduction"] // self.stride)
        else:
            self.stage_modules = None
            self.roi_fallback = nn.Sequential(
                nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1), nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.head_channels = self.out_channels
            roi = 7
        self.defaults = BackboneDefaults(input_size=input_size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                                         std=tuple(cfg.get("std", IMAGENET_STD)), roi_output_size=roi,
                                         min_input_size=32)

    @property
    def sequential(self) -> bool:
        """Whether the RoI head is the rest of the timm network (else the fallback convolution head)."""
        return self.stage_modules is not None

    def _sequential_plan(self, input_size: tuple[int, ...]):
        """(trunk stages, RoI head modules, forward_head modules, head channels), or None when the model's
        children are not its forward order (see the module docstring)."""
        mods = module_list(self.model, [f["module"] for f in self.features])
        names = [n for n, _ in mods]
        pos = {i: names.index(f["module"]) for i, f in enumerate(self.features) if f["module"] in names}
        last = len(self.features) - 1
        if self.cut not in pos or last not in pos or pos[self.cut] >= pos[last] \
                or not callable(getattr(self.model, "forward_head", None)):
            return None
        side = min(CHECK_SIDE, input_size[-1])
        x = torch.randn(1, input_size[0], side, side, generator=torch.Generator().manual_seed(0))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                logits = self.model(x)
                outs = []  # outs[k]: the output of mods[:k + 1]
                y = x
                for _, m in mods:
                    try:
                        y = m(y.clone())  # clone: an in-place module must not alter a stored output
                    except Exception:  # noqa: BLE001 - the classifier layers need a pooled input
                        break
                    outs.append(y)
                cut_out = outs[pos[self.cut]] if len(outs) > pos[self.cut] else None
                if not (isinstance(cut_out, Tensor) and cut_out.dim() == 4 and cut_out.shape[1] == self.out_channels):
                    return None
                # the first module of forward_head is the first one after which forward_head reproduces the logits
                for k in range(len(outs), pos[last], -1):
                    try:
                        same = torch.allclose(self.model.forward_head(outs[k - 1]), logits, rtol=1e-4, atol=1e-5)
                    except Exception:  # noqa: BLE001 - a candidate split that does not even run
                        continue
                    if same:
                        pre = self.model.forward_head(outs[k - 1], pre_logits=True).flatten(1)
                        break
                else:
                    return None
        except Exception:  # noqa: BLE001 - any model that cannot be probed this way takes the fallback
            return None
        finally:
            self.model.train(was_training)
        bounds = sorted(p for i, p in pos.items() if i <= self.cut)
        stages, start = [], 0
        for b in bounds:
            stages.append(nn.Sequential(*(m for _, m in mods[start:b + 1])))
            start = b + 1
        head = [m for _, m in mods[pos[self.cut] + 1:k]]
        tail = [m for _, m in mods[k:]]
        return stages, head, tail, int(pre.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def remap_state_dict(self, state: dict) -> dict:
        """A timm checkpoint names the model's own parameters; here they live under ``model.``."""
        return {k if k.startswith(("model.", "roi_fallback.")) else f"model.{k}": v for k, v in state.items()}

    def feature_stages(self) -> FeatureStages:
        """Sequential models: the children grouped at every feature module of ``feature_info`` (the trunk's
        stages, then the rest up to the deepest map), one stage per declared map. Other models expose none."""
        if not self.sequential:
            raise NotImplementedError(f"{PREFIX}{self.timm_name}: not a chain of modules, so no feature stages "
                                      f"(only forward_intermediates)")
        mods = module_list(self.model, [f["module"] for f in self.features])
        names = [n for n, _ in mods]
        found = [f for f in self.features if f["module"] in names]  # maps inside a child end with that child
        stages, start = [], 0
        for f in found:
            end = names.index(f["module"]) + 1
            stages.append(nn.Sequential(*(m for _, m in mods[start:end])))
            start = end
        return FeatureStages(stages, [FeatureInfo(f["module"], f["num_chs"], f["reduction"]) for f in found])

    def detection_parts(self) -> DetectionParts:
        if self.sequential:
            stages = list(self.stage_modules)
            trunk = nn.Sequential(*stages)
            box_head = nn.Sequential(*self.head_modules, PreLogits(self.model, self.tail_modules))
        else:
            stages = []
            trunk = IntermediatesTrunk(self.model, self.cut)
            box_head = self.roi_fallback
        return DetectionParts(trunk=trunk, box_head=box_head, out_channels=self.out_channels, stride=self.stride,
                              head_channels=self.head_channels, stages=stages)


def _builder(timm: Any, name: str) -> Callable[..., TimmBackbone]:
    def build(num_classes: int = 1000, pretrained_file: str | None = None,
              model_kwargs: dict | None = None) -> TimmBackbone:
        kwargs = dict(model_kwargs or {})
        kwargs["num_classes"] = num_classes
        if pretrained_file:
            if not os.path.isfile(pretrained_file):
                raise FileNotFoundError(f"{PREFIX}{name}: pretrained_file not found: {pretrained_file}")
            overlay = dict(file=os.fspath(pretrained_file))
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
        return TimmBackbone(model, name)

    build.__doc__ = (f"timm model {name!r}. pretrained_file: local weights loaded by timm; "
                     f"model_kwargs: extra timm.create_model arguments (drop_path_rate, ...).")
    return build


@hookimpl
def detkit_register_backbones(register):
    try:
        import timm
    except ImportError:
        return  # timm is optional: without it this plugin provides nothing, silently
    for name in timm.list_models():
        register(f"{PREFIX}{name}", _builder(timm, name), family="timm", paper="timm (Wightman 2019)")
