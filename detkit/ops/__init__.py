"""Core detection operations, on torchvision.ops kernels where one exists."""
from detkit.ops.anchors import AnchorGenerator
from detkit.ops.boxes import BoxCoder, batched_nms, box_iou, clip_boxes, remove_small_boxes
from detkit.ops.matching import BalancedSampler, Matcher
from detkit.ops.roi import RoIAlignExtractor, RoIPoolExtractor

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "batched_nms",
    "box_iou",
    "clip_boxes",
    "remove_small_boxes",
    "BalancedSampler",
    "Matcher",
    "RoIAlignExtractor",
    "RoIPoolExtractor",
]
