"""Classifier evaluation: top-1 / top-5 accuracy, per-class accuracy, the confusion matrix and its picture,
single-view or 10-crop testing (``detkit eval-cls``, and the validation of ``detkit pretrain``)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from detkit.classification.loading import test_batches
from detkit.classification.model import Classifier, main_logits
from detkit.classification.transforms import ClassifierAugment, ten_crops
from detkit.engine.files import write_json_atomic


class TenCrops:
    """The test transform of 10-crop testing: ``image -> (10, size, size, 3)``."""

    def __init__(self, size: int, test_resize: float):
        self.size, self.test_resize = size, test_resize

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(ten_crops(image, self.size, self.test_resize))


@torch.no_grad()
def predict(model: Classifier, dataset, size: int, test_resize: float, device: torch.device, batch_size: int = 64,
            num_workers: int = 0, ten_crop: bool = False, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities ``(N, K)`` (the mean over the ten crops with ``ten_crop``) and labels ``(N,)`` of
    every image of ``dataset``, in order. The model is put in eval mode; the caller restores training mode.
    The dataset's transform is replaced for the pass and restored after."""
    saved = dataset.transform
    dataset.transform = TenCrops(size, test_resize) if ten_crop else ClassifierAugment(size, None, test_resize)
    model.eval()
    probs, labels = [], []
    try:
        batches = test_batches(dataset, batch_size, num_workers)
        if progress:
            from detkit.engine.progress import progress_bar

            batches = progress_bar(batches, desc="eval")
        for images, y, _ in batches:
            images = images.to(device, non_blocking=True)
            if ten_crop:  # (B, 10, 3, S, S): one forward for all crops, the softmax averaged per image
                b = images.shape[0]
                p = F.softmax(main_logits(model(images.flatten(0, 1))).float(), 1).view(b, 10, -1).mean(1)
            else:
                p = F.softmax(main_logits(model(images)).float(), 1)
            probs.append(p.cpu())
            labels.append(y)
    finally:
        dataset.transform = saved
    return torch.cat(probs), torch.cat(labels)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """``top1``, ``top5`` (top-k with k = min(5, K)), ``loss`` (cross-entropy of the probabilities), per-class
    accuracy (recall of each class; None for a class without images) and the confusion matrix (rows: true
    class, columns: predicted)."""
    k = min(5, probs.shape[1])
    top = probs.topk(k, 1).indices
    hit = top == labels[:, None]
    confusion = torch.zeros(len(class_names), len(class_names), dtype=torch.int64)
    confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
    per_class_total = confusion.sum(1)
    per_class = {name: (float(confusion[i, i] / per_class_total[i]) if per_class_total[i] else None)
                 for i, name in enumerate(class_names)}
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels)
    return {"count": int(labels.numel()), "top1": float(hit[:, 0].float().mean()), "top5": float(hit.any(1).float().mean()),
            "top5_k": k, "loss": float(loss), "per_class": per_class, "confusion": confusion.tolist(),
            "class_names": list(class_names)}


def plot_confusion(metrics: dict, path: str, title: str = "") -> None:
    """The confusion matrix, each row normalised by its class's images (the diagonal is the per-class
    accuracy), with the counts written in the cells when there are at most 20 classes."""
    from detkit.evaluation.reports import _plt, _save

    confusion = np.array(metrics["confusion"], dtype=np.float64)
    names = metrics["class_names"]
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    plt = _plt()
    side = min(max(4.0, 0.45 * len(names) + 2.5), 16.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 6 else 0, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(title or f"top-1 {metrics['top1']:.1%} on {metrics['count']} images", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def write_report(metrics: dict, out_dir: str, title: str = "") -> None:
    """``metrics.json`` and ``confusion_matrix.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics, indent=1)
    plot_confusion(metrics, os.path.join(out_dir, "confusion_matrix.png"), title)


def format_metrics(metrics: dict) -> str:
    """A few lines for the terminal: top-1, top-5 and the per-class accuracies."""
    lines = [f"top-1 {metrics['top1']:.4f}  top-{metrics['top5_k']} {metrics['top5']:.4f}  "
             f"({metrics['count']} images, loss {metrics['loss']:.4f})"]
    width = max(len(n) for n in metrics["per_class"])
    lines += [f"  {name:<{width}}  {'-' if acc is None else f'{acc:.4f}'}" for name, acc in metrics["per_class"].items()]
    return "\n".join(lines)
