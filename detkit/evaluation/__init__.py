"""Detection metrics: the COCO box metric (``coco_eval``) and PASCAL VOC AP (``voc_eval``)."""
from detkit.evaluation.coco_eval import detections_to_coco_results, evaluate_coco, format_metrics_table

__all__ = ["detections_to_coco_results", "evaluate_coco", "format_metrics_table"]
