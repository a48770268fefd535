"""Detection metrics (the COCO box metric in ``coco_eval``, PASCAL VOC AP in ``voc_eval``) and evaluating a
detector on a dataset (``runner``)."""
from detkit.evaluation.coco_eval import detections_to_coco_results, evaluate_coco, format_metrics_table
from detkit.evaluation.runner import evaluate, format_metrics, predict_dataset, score_results

__all__ = ["detections_to_coco_results", "evaluate_coco", "format_metrics_table", "evaluate", "format_metrics",
           "predict_dataset", "score_results"]
