"""Semantic segmentation with a BEiT backbone: pyramid neck, UperNet head, data, metrics, inference.

The CLI is :mod:`fastbeit.segment`; these modules are its parts, each with one job.
"""

from fastbeit.segmentation.backbone import BeitBackbone, scaled_out_indices, segmentation_config
from fastbeit.segmentation.inference import predict, slide_logits
from fastbeit.segmentation.metrics import confusion_matrix, segmentation_metrics
from fastbeit.segmentation.model import BeitSegmenter, HeadConfig

__all__ = [
    "BeitBackbone",
    "BeitSegmenter",
    "HeadConfig",
    "confusion_matrix",
    "predict",
    "scaled_out_indices",
    "segmentation_config",
    "segmentation_metrics",
    "slide_logits",
]
