"""R-CNN's post-hoc classifiers and box regressor (Girshick et al. 2014, Sec. 2.3, Appendix B and C).

After fine-tuning, R-CNN throws the softmax layer away and trains one linear SVM per class
on fc7 features scaled so their mean L2 norm is 20 (Sec. 2.3). Positives are the ground-truth
boxes of the class only; negatives are regions whose IoU with every ground truth of the class
is below 0.3; regions in between are ignored (Appendix B). The negatives do not fit in memory,
so they are mined: the training set is scanned once, negatives scoring above -1.0001 are added
to a cache, the SVM is retrained (liblinear, C = 0.001, positive loss weight 2, bias feature 10)
whenever enough new ones came in, and cached negatives scoring below -1.2 are evicted.
A class-specific ridge regressor on pool5 features (lambda = 1000, proposals of IoU > 0.6 with
a ground truth of the class) then predicts the targets (t_x, t_y, t_w, t_h) of Appendix C.

:class:`SVMBoxHead` (``head``) is the predictor of the RoI heads that holds both, with its settings;
:func:`fit_svm_head` (``stage``) runs the whole stage: region features into a
:class:`~detkit.models.feature_cache.FeatureCache`, SVMs by :func:`train_linear_svms` (``mining``), regressor by
:func:`train_box_regressor` (``regressor``).
"""
from __future__ import annotations

from detkit.models.svm.head import NEVER_FIRES_BIAS, POOLED, VECTORS, SVMBoxHead, SVMSettings
from detkit.models.svm.mining import hard_negative_mining, train_linear_svms
from detkit.models.svm.regressor import box_regression_targets, ridge_regression, train_box_regressor
from detkit.models.svm.stage import fit_svm_head, region_overlaps

__all__ = ["NEVER_FIRES_BIAS", "POOLED", "VECTORS", "SVMBoxHead", "SVMSettings", "hard_negative_mining",
           "train_linear_svms", "box_regression_targets", "ridge_regression", "train_box_regressor",
           "fit_svm_head", "region_overlaps"]
