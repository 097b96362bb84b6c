"""The random part of the report's transforms, per batch on the device: `GpuAugment` (the batch API) and its two
backends (torch/Kornia ops on any device, OpenCV per image on the CPU), and the preview that draws what they do.
Imports pipeline/ and torch, no other train/ room."""
from train.augment.batch import BACKENDS, OPS, AugConfig, AugParams, GpuAugment

__all__ = ["BACKENDS", "OPS", "AugConfig", "AugParams", "GpuAugment"]
