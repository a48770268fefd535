"""detkit: plugin-based two-stage object detection (R-CNN, SPP-net, Fast R-CNN, Faster R-CNN)."""
__version__ = "0.1.0"
