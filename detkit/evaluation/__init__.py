"""Detection metrics."""
from detkit.evaluation.coco_eval import detections_to_coco_results, evaluate_coco, format_metrics_table

__all__ = ["detections_to_coco_results", "evaluate_coco", "format_metrics_table"]
