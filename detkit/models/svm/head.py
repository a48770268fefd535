"""The predictor of R-CNN's post-hoc stage (Girshick et al. 2014, Sec. 2.3, Appendix C): per-class linear
SVMs on fc7 and class-specific ridge box regressors on pool5, loaded as buffers once
:func:`~detkit.models.svm.stage.fit_svm_head` has trained them, and the ``svm`` box predictor's settings.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from detkit.config import ranged
from detkit.models.roi_heads import BoxPredictor

POOLED = "pool5"  # the flattened output of the RoI feature extractor (pool5 for AlexNet / VGG)
VECTORS = "fc7"  # the output of the backbone's RoI head (fc7 for AlexNet / VGG)
NEVER_FIRES_BIAS = -1e4  # bias of a class without positives: its SVM never scores above any threshold

_UNFITTED = "the SVMs of this R-CNN are not trained: run the SVM stage (detkit train ...)"


@dataclass
class SVMSettings:
    """The ``svm`` box predictor's config keys: the R-CNN post-hoc classifiers (Sec. 2.3, Appendix B) and box
    regressor (Appendix C)."""

    C: float = ranged(0.001, gt=0)  # liblinear's C, as in R-CNN
    positive_weight: float = ranged(2.0, gt=0)
    bias_multiplier: float = ranged(10.0, gt=0)
    neg_iou: float = ranged(0.3, ge=0, le=1)  # negatives: IoU < 0.3 with every ground truth of the class
    hard_thresh: float = -1.0001  # negatives scoring above this are hard
    evict_thresh: float = -1.2  # cached negatives scoring below this are dropped after a retrain
    retrain_limit: int = ranged(2000, ge=1)  # retrain a class's SVM once this many new hard negatives were mined
    rounds: int = ranged(1, ge=1)  # passes of hard-negative mining over the training set
    max_iter: int = ranged(10000, ge=1)  # liblinear iterations per fit
    tol: float = ranged(0.1, gt=0)  # liblinear's default stopping tolerance for the dual solver, as R-CNN ran it
    cache_dtype: str = "float32"  # float16 halves the feature cache (R-CNN's VOC cache is hundreds of GB)
    feature_norm: float = ranged(20.0, gt=0)  # features are scaled so their mean L2 norm is this
    ridge_lambda: float = ranged(1000.0, ge=0)
    ridge_min_iou: float = ranged(0.6, ge=0, le=1)  # box regression learns from proposals with IoU > 0.6


class SVMBoxHead(BoxPredictor):
    """Per-class linear SVMs and ridge box regressors as the predictor of the RoI heads.

    ``forward(vectors (R, D), pooled (R, P) | None) -> scores (R, K+1), deltas (R, 4(K+1))``:
    ``scores[:, k] = feature_scale * vectors @ svm_weight[k-1] + svm_bias[k-1]`` (SVM margins, not
    probabilities; column 0, background, is 0). ``deltas[:, 4k:4k+4]`` are the class-k regressor's
    predictions in the parametrisation of the RoI heads' :class:`~detkit.ops.BoxCoder` with
    ``box_coder_weights``: the regressor predicts R-CNN's raw targets (coder weights 1, 1, 1, 1), which
    are multiplied by the coder weights here. Deltas are 0 (boxes = proposals) for background, when
    ``pooled`` is None, when ``pooled_features`` is None or when the regressor was not fitted.

    Buffers (all saved in the state dict): ``svm_weight (K, D)``, ``svm_bias (K,)``, ``feature_scale ()``,
    ``reg_weight (K, P+1, 4)`` (last row: bias), ``reg_mean (K, 4)``, ``reg_std (K, 4)`` (target
    standardisation), ``pooled_scale ()`` (pool5 features are scaled to mean norm 20 too, as R-CNN did,
    so that lambda means the same for every backbone), ``fitted ()`` and ``regressor_fitted ()`` bools.
    """

    def __init__(self, in_features: int, num_classes: int, pooled_features: int | None = None,
                 box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)):
        super().__init__()
        if len(box_coder_weights) != 4:
            raise ValueError(f"box_coder_weights must have 4 values, got {list(box_coder_weights)}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.pooled_features = None if pooled_features is None else int(pooled_features)
        k, p = self.num_classes, self.pooled_features or 0
        self.register_buffer("svm_weight", torch.zeros(k, self.in_features))
        self.register_buffer("svm_bias", torch.zeros(k))
        self.register_buffer("feature_scale", torch.tensor(1.0))
        self.register_buffer("reg_weight", torch.zeros(k, p + 1, 4))
        self.register_buffer("reg_mean", torch.zeros(k, 4))
        self.register_buffer("reg_std", torch.ones(k, 4))
        self.register_buffer("pooled_scale", torch.tensor(1.0))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("regressor_fitted", torch.tensor(False))
        self.register_buffer("coder_weights", torch.tensor([float(w) for w in box_coder_weights]), persistent=False)

    def forward(self, vectors: Tensor, pooled: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self.training and not bool(self.fitted):
            raise RuntimeError(_UNFITTED)
        x = vectors.flatten(1).float()
        if x.shape[1] != self.in_features:
            raise ValueError(f"SVMBoxHead expects {self.in_features}-d vectors, got shape {tuple(vectors.shape)}")
        svm_scores = self.feature_scale * (x @ self.svm_weight.T) + self.svm_bias
        scores = torch.cat([svm_scores.new_zeros(x.shape[0], 1), svm_scores], dim=1)
        deltas = x.new_zeros(x.shape[0], self.num_classes + 1, 4)
        if pooled is not None and self.pooled_features is not None and bool(self.regressor_fitted):
            deltas[:, 1:] = self.regress(pooled)
        return scores, deltas.view(x.shape[0], 4 * (self.num_classes + 1))

    def class_scores(self, class_logits: Tensor) -> Tensor:
        """SVM margins are thresholded and ranked as they are (no softmax)."""
        return class_logits.float()

    def regress(self, pooled: Tensor) -> Tensor:
        """``pooled (R, P)`` -> per-class deltas ``(R, K, 4)`` in the box coder's parametrisation."""
        p = pooled.flatten(1).float()
        if p.shape[1] != self.pooled_features:
            raise ValueError(f"SVMBoxHead's regressor expects {self.pooled_features}-d pooled features, "
                             f"got shape {tuple(pooled.shape)}")
        w = self.reg_weight[:, :-1]  # (K, P, 4)
        t = torch.einsum("rp,kpc->rkc", self.pooled_scale * p, w) + self.reg_weight[:, -1]
        return (t * self.reg_std + self.reg_mean) * self.coder_weights

    @torch.no_grad()
    def set_svms(self, weight: np.ndarray | Tensor, bias: np.ndarray | Tensor, feature_scale: float) -> None:
        """Load trained SVMs: ``weight (K, D)``, ``bias (K,)`` for features multiplied by ``feature_scale``."""
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        if weight.shape != self.svm_weight.shape or bias.shape != self.svm_bias.shape:
            raise ValueError(f"SVM weights of shape {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit a "
                             f"head of {self.num_classes} classes on {self.in_features}-d features")
        self.svm_weight.copy_(weight)
        self.svm_bias.copy_(bias)
        self.feature_scale.fill_(float(feature_scale))
        self.fitted.fill_(True)

    @torch.no_grad()
    def set_regressor(self, weight: np.ndarray | Tensor, mean: np.ndarray | Tensor, std: np.ndarray | Tensor,
                      pooled_scale: float) -> None:
        """Load ridge regressors: ``weight (K, P+1, 4)``, target ``mean``/``std (K, 4)``."""
        weight, mean, std = torch.as_tensor(weight), torch.as_tensor(mean), torch.as_tensor(std)
        if weight.shape != self.reg_weight.shape or mean.shape != self.reg_mean.shape or std.shape != mean.shape:
            raise ValueError(f"regressor of shape {tuple(weight.shape)} (mean {tuple(mean.shape)}, std "
                             f"{tuple(std.shape)}) does not fit reg_weight {tuple(self.reg_weight.shape)}")
        self.reg_weight.copy_(weight)
        self.reg_mean.copy_(mean)
        self.reg_std.copy_(std)
        self.pooled_scale.fill_(float(pooled_scale))
        self.regressor_fitted.fill_(True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, pooled_features={self.pooled_features}"
