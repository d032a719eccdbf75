"""Datasets and augmentation: the COCO reader, the synthetic shapes generator,
and the v2 transforms shared by training, evaluation and serving."""

from training.data.coco import CocoInstances, collate, load_image, remove_degenerate_boxes
from training.data.synthetic import SHAPES, make_synthetic
from training.data.transforms import (
    STRONG_AUGMENTATION_KINDS,
    ResizeShortestEdge,
    build_strong_augmentation,
    build_test_transforms,
    build_train_transforms,
    resize_shortest_edge_size,
)

__all__ = [
    "SHAPES",
    "STRONG_AUGMENTATION_KINDS",
    "CocoInstances",
    "ResizeShortestEdge",
    "build_strong_augmentation",
    "build_test_transforms",
    "build_train_transforms",
    "collate",
    "load_image",
    "make_synthetic",
    "remove_degenerate_boxes",
    "resize_shortest_edge_size",
]
