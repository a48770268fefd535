"""Datasets, image reading, augmentation and the built-in synthetic data."""
from detkit.data.coco import COCODataset
from detkit.data.dataset import DatasetError, DetectionDataset, ImageRecord
from detkit.data.images import ImageReadError, read_image
from detkit.data.synth import synthesize, synthesize_video
from detkit.data.transforms import build_transform, collate
from detkit.data.voc import VOC_CLASSES, VOCDataset

__all__ = ["COCODataset", "DatasetError", "DetectionDataset", "ImageRecord", "ImageReadError", "read_image",
           "build_transform", "collate", "VOCDataset", "VOC_CLASSES", "synthesize", "synthesize_video"]
