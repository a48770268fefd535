"""The lineage's staged training schedules, registered by this plugin (``detkit_register_schedules``) and
built from ``detkit.training``'s trainer and stage helpers.

- ``svm_posthoc``, R-CNN and SPP-net with SVMs (R-CNN Sec. 2.3; SPP-net Sec. 4.1): the network is first
  fine-tuned with the predictor the post-hoc predictor's registration names as ``finetune_predictor`` (a softmax over N+1
  classes, ``work_dir/finetune``); then fc7 and pool5 features of every training region go to an on-disk
  cache, one linear SVM per class is trained with hard-negative mining and a ridge regressor per class learns
  box corrections; the result is one checkpoint.
- ``four_step``, Faster R-CNN's alternating training (Ren et al. 2015, Sec. 3.2): (1) train the RPN from the
  pretrained network; (2) train a separate Fast R-CNN on step-1 proposals; (3) initialise the RPN's
  trunk from step 2, keep it fixed and train the RPN's own layers; (4) keep the shared trunk fixed and
  fine-tune the Fast R-CNN layers on step-3 proposals. Each step lives in ``work_dir/stepK_*``; a step
  whose ``final.pth`` exists is not run again (``--resume`` continues an interrupted step), and the
  steps' proposals are cached per dataset under ``work_dir/proposals``.

Both run as one process (registered ``single_process``: ``torchrun`` runs only end-to-end training).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from detkit.config import Config, ConfigError, PartConfig, bind_parts, ranged
from detkit.data.loading import build_dataset
from detkit.engine.devices import resolve_device
from detkit.models.assembly import build_detector
from detkit.proposals.attach import attach_proposals
from detkit.training.stages import file_digest, finish, freeze, resolved, run_stage, stage_config

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- R-CNN / SPP-net SVMs


def _state_without(model: nn.Module, part: nn.Module) -> tuple[dict, str]:
    """``model``'s state dict without the entries of its submodule ``part``, and ``part``'s key prefix."""
    prefix = next(name for name, module in model.named_modules() if module is part) + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}, prefix


def _posthoc_detector(cfg: Config, registries, tuned: nn.Module) -> nn.Module:
    """The detector with the post-hoc head, every other weight taken from the fine-tuned network."""
    model = build_detector(cfg.model, registries, cfg.model.num_classes, cfg.model.class_names)
    state, _ = _state_without(tuned, tuned.roi_heads.predictor)
    _, head = _state_without(model, model.roi_heads.predictor)
    missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.startswith(head)]
    if missing:
        raise RuntimeError(f"fine-tuned weights do not fit the SVM detector: missing {missing[:3]}")
    return model


def train_with_svms(cfg: Config, registries, resume=None, progress: bool = True) -> dict:
    """Fine-tune with softmax, then fit the SVMs and box regressors of the ``svm`` head (see module doc)."""
    from detkit.models.svm import fit_svm_head

    head = cfg.model.box_predictor.name
    info = registries.box_predictors.get(head).info
    finetune_head = info.get("finetune_predictor") or info.get("finetune_head")  # (the name of earlier releases)
    if not finetune_head:
        raise ConfigError(f"model.box_predictor.name={head!r}: the post-hoc schedule fine-tunes with another "
                          f"predictor first, and {head!r} declares none (finetune_predictor=... in its registration)")
    cfg = bind_parts(resolved(cfg), registries)
    finetune = stage_config(cfg, "finetune")
    finetune.model.box_predictor = PartConfig(finetune_head)  # with that head's default settings
    tuned, ckpt = run_stage(finetune, registries, resume, progress)

    cfg.model.backbone.weights = None  # the fine-tuned weights replace them
    cfg.model.num_classes, cfg.model.class_names = finetune.model.num_classes, finetune.model.class_names
    model = _posthoc_detector(cfg, registries, tuned)
    device = resolve_device(cfg.train.device)
    model.to(device).eval()
    dataset = build_dataset(cfg.data.train, registries, "train")
    attach_proposals(dataset, model, progress)
    fingerprint = file_digest(os.path.join(finetune.train.work_dir, "final.pth"))
    svm = cfg.model.box_predictor.settings
    stats = fit_svm_head(model, dataset, proposals_fn=dataset.proposals.get, head=model.roi_heads.predictor,
                         work_dir=cfg.train.work_dir, device=device, cfg=svm,
                         fingerprint=f"{fingerprint}:{dataset.proposals.fingerprint}:{cfg.model.roi_extractor}:"
                                     f"{svm.cache_dtype}", progress=progress)
    log.info("SVM stage: %d regions, features %s, SVMs and regressors fitted in %.1f s", stats["num_rows"],
             "reused" if stats["reused_cache"] else "extracted", sum(stats["seconds"].values()))
    return finish(cfg, registries, model.cpu(), ckpt, progress)


# ----------------------------------------------------------------------------- 4-step Faster R-CNN


def rpn_proposal_cache(model: nn.Module, dataset, root: str, name: str, device: torch.device,
                       progress: bool = True):
    """Proposals of ``model``'s RPN for every image of ``dataset`` (original coordinates; the training
    pre/post-NMS top-N, 12000/2000, since the next step trains on them), cached under ``root`` per dataset
    and RPN weights."""
    from detkit.proposals.cache import ProposalCache
    from detkit.proposals.compute import compute_proposals

    digest = hashlib.sha256()
    for k, v in sorted(model.proposal_generator.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().numpy().tobytes())
    for k, v in sorted(model.trunk.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().numpy().tobytes())
    cache = ProposalCache(root, dataset, name, {"weights": digest.hexdigest()})
    return compute_proposals(model, dataset, device, phase="train", cache=cache, progress=progress)


@dataclass
class FourStepSettings:
    """The ``four_step`` schedule's keys (``train.schedule: {name: four_step, iters: [...]}``)."""

    # iterations of each step; the learning rate is divided by 10 at three quarters of each (py-faster-rcnn)
    iters: list[int] = ranged(default_factory=lambda: [80000, 40000, 80000, 40000], ge=1)


def _checked_four_step(cfg: Config, settings: FourStepSettings) -> Config:
    if cfg.model.proposal_generator.name != "rpn":
        raise ConfigError(f"train.schedule=four_step trains an RPN: model.proposal_generator.name must be 'rpn', "
                          f"not {cfg.model.proposal_generator.name!r}")
    if len(settings.iters) != 4:
        raise ConfigError(f"train.schedule.iters={settings.iters}: expected four positive iteration counts")
    return resolved(cfg)


def train_four_step(settings: FourStepSettings, context) -> dict:
    """Faster R-CNN by alternating training (see module doc); ``settings.iters`` iterations per step."""
    registries, resume, progress = context.registries, context.resume, context.progress
    cfg = bind_parts(_checked_four_step(context.config, settings), registries)
    rpn = cfg.model.proposal_generator.settings
    iters = settings.iters
    device = resolve_device(cfg.train.device)
    proposals_root = os.path.join(cfg.train.work_dir, "proposals")

    # Step 1: the RPN, from the pretrained network.
    step1 = stage_config(cfg, "step1_rpn", iters[0])
    rpn1, _ = run_stage(step1, registries, resume, progress, init=lambda m: freeze(m.roi_heads),
                        loss_prefixes=("rpn/",))
    train_set = build_dataset(cfg.data.train, registries, "train")
    props1 = rpn_proposal_cache(rpn1, train_set, proposals_root, "rpn-step1", device, progress)

    # Step 2: a separate Fast R-CNN (its own trunk, from the pretrained network) on step-1 proposals.
    step2 = stage_config(cfg, "step2_fast_rcnn", iters[1])
    step2.model.detector = PartConfig("two_stage")
    step2.model.proposal_generator = PartConfig("precomputed", {"top_k": rpn.post_nms_top_n_train})
    fast2, _ = run_stage(step2, registries, resume, progress, init=lambda m: freeze(m.proposal_generator),
                         proposals=props1, loss_prefixes=("roi/",))

    # Step 3: the RPN on the step-2 trunk, which stays fixed: only the RPN's own layers learn.
    def init3(model):
        model.trunk.load_state_dict(fast2.trunk.state_dict())
        model.proposal_generator.load_state_dict(rpn1.proposal_generator.state_dict())
        return freeze(model.trunk, model.roi_heads)

    step3 = stage_config(cfg, "step3_rpn", iters[2])
    step3.model.backbone.weights = None  # the trunk comes from step 2
    rpn3, _ = run_stage(step3, registries, resume, progress, init=init3, loss_prefixes=("rpn/",))
    props3 = rpn_proposal_cache(rpn3, train_set, proposals_root, "rpn-step3", device, progress)

    # Step 4: the Fast R-CNN layers on step-3 proposals, the shared trunk fixed.
    def init4(model):
        model.trunk.load_state_dict(fast2.trunk.state_dict())
        model.roi_heads.load_state_dict(fast2.roi_heads.state_dict())
        return freeze(model.trunk, model.proposal_generator)

    step4 = copy.deepcopy(step2)
    step4.train = stage_config(cfg, "step4_fast_rcnn", iters[3]).train
    step4.model.backbone.weights = None
    fast4, ckpt4 = run_stage(step4, registries, resume, progress, init=init4, proposals=props3,
                             loss_prefixes=("roi/",))
    ckpt4 = {**ckpt4, "iteration": sum(int(n) for n in iters)}
    return _assemble_four_step(cfg, registries, rpn3, fast4, ckpt4, progress)


def _assemble_four_step(cfg: Config, registries, rpn3: nn.Module, fast4: nn.Module, ckpt4: dict,
                        progress: bool) -> dict:
    """One network: the shared trunk, the step-3 RPN layers, the step-4 detection layers."""
    final_cfg = copy.deepcopy(cfg)
    final_cfg.model.backbone.weights = None
    names = list(ckpt4["class_names"])
    model = build_detector(final_cfg.model, registries, len(names), names)
    model.trunk.load_state_dict(fast4.trunk.state_dict())
    model.proposal_generator.load_state_dict(rpn3.proposal_generator.state_dict())
    model.roi_heads.load_state_dict(fast4.roi_heads.state_dict())
    return finish(final_cfg, registries, model, ckpt4, progress)
