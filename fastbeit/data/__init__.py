"""Datasets and augmentations: image folders, WebDataset shards, the faithful two-view transform, DALI (GPU)."""

from fastbeit.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, find_images
from fastbeit.data.transforms import BeitPretrainTransform, TwoViewTransform, map_pixels, unmap_pixels

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "find_images",
    "BeitPretrainTransform",
    "TwoViewTransform",
    "map_pixels",
    "unmap_pixels",
]
