"""The preprocessing parameters: one frozen value, the single source of truth.

Everything that changes a cached pixel, label or split lives here, and the cache key is a hash of
`PreprocessConfig.as_dict()` plus the source fingerprint, so a changed parameter can never reuse a stale cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

FORMAT_VERSION = 1
# stored_size / context_crop may differ from size / crop by this fraction (0.1%: under 0.15 px at a 224 px edge).
MAX_SCALE_ERROR = 1e-3


@dataclass(frozen=True)
class PreprocessConfig:
    # CLAHE on each BGR channel, as in the report (cv2.createCLAHE(clipLimit=3.0, tileGridSize=(9, 9))).
    clahe_clip: float = 3.0
    clahe_tiles: int = 9
    # Unsharp mask: (1 + s) * img - s * GaussianBlur(img, sigma), saturated to uint8.
    unsharp_sigma: float = 3.0
    unsharp_strength: float = 1.5
    # The report's CenterCrop(270) of a 450 px image; other image sizes keep the same fraction.
    crop_px: int = 270
    reference_px: int = 450
    # Training rotates by up to this angle; the cache keeps enough context around the crop for it.
    max_rotation_deg: float = 20.0
    # Split used where the source gives none: train/valid/test fractions and the seed of the assignment.
    split_fractions: tuple[float, float, float] = (0.75, 0.15, 0.10)
    split_seed: int = 0
    # Images per HDF5 shard file (part of the on-disk layout, so part of the key too).
    shard_size: int = 1024

    def __post_init__(self) -> None:
        checks = [
            (self.clahe_clip > 0, f"clahe_clip must be > 0, got {self.clahe_clip}"),
            (self.clahe_tiles >= 1, f"clahe_tiles must be >= 1, got {self.clahe_tiles}"),
            (self.unsharp_sigma > 0, f"unsharp_sigma must be > 0, got {self.unsharp_sigma}"),
            (self.unsharp_strength >= 0, f"unsharp_strength must be >= 0, got {self.unsharp_strength}"),
            (0 < self.crop_px <= self.reference_px,
             f"crop_px must be in (0, reference_px={self.reference_px}], got {self.crop_px}"),
            (0 <= self.max_rotation_deg < 45, f"max_rotation_deg must be in [0, 45), got {self.max_rotation_deg}"),
            (len(self.split_fractions) == 3 and all(f > 0 for f in self.split_fractions)
             and abs(sum(self.split_fractions) - 1) < 1e-6,
             f"split_fractions must be three positive numbers summing to 1, got {self.split_fractions}"),
            (self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split_fractions"] = list(self.split_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        d = dict(d)
        d["split_fractions"] = tuple(d["split_fractions"])
        return cls(**d)

    def digest(self) -> str:
        """Stable hash of every parameter (and the format version)."""
        blob = json.dumps({"format_version": FORMAT_VERSION, **self.as_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def geometry(self, size: int) -> "Geometry":
        return geometry_for(size, self.crop_px, self.reference_px, self.max_rotation_deg)


@dataclass(frozen=True)
class Geometry:
    """Where a stored image comes from, in pixels of a `reference_px` source image.

    The cache stores the `context_crop` window (the report's `crop` window plus a margin for rotation) resized to
    `stored_size`. The centre `size` x `size` window of a stored image is the report's crop resized to `size`.
    """
    size: int
    crop: int
    context_crop: int
    stored_size: int

    @property
    def margin(self) -> int:
        """Stored pixels on each side of the centre `size` window."""
        return (self.stored_size - self.size) // 2


def geometry_for(size: int, crop_px: int, reference_px: int, max_rotation_deg: float) -> Geometry:
    """Pick `context_crop` and `stored_size` for one output size.

    A `crop_px` window rotated by up to `max_rotation_deg` reaches a square of side
    crop * (cos a + sin a) (~346.1 px for 270 px and 20 degrees), plus one pixel for bilinear sampling.
    Both margins must be whole and even-sided so that the centre windows stay pixel-aligned: context_crop = crop + 2k
    and stored_size = size + 2m. Among the candidates that cover the rotation we take the first k whose
    m = round(k * size / crop) gives an error in stored_size / context_crop against size / crop under
    MAX_SCALE_ERROR (the smallest such context keeps the cache small: 224 px stores 292 px), else the best one.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    a = math.radians(max_rotation_deg)
    needed = crop_px * (math.cos(a) + math.sin(a)) + (1 if max_rotation_deg > 0 else 0)
    k_min = max(0, math.ceil((needed - crop_px) / 2))
    k_max = (reference_px - crop_px) // 2
    if k_min > k_max:
        raise ValueError(
            f"a {crop_px} px crop rotated by {max_rotation_deg} degrees needs {needed:.0f} px of context, "
            f"more than the {reference_px} px image holds; lower --crop-px or --max-rotation-deg")
    stored_needed = size * (math.cos(a) + math.sin(a)) + (1 if max_rotation_deg > 0 else 0)
    target = size / crop_px
    best = None
    for k in range(k_min, min(k_max, k_min + 16) + 1):
        m = round(k * size / crop_px)
        context, stored = crop_px + 2 * k, size + 2 * m
        if stored < stored_needed:
            continue  # rounding m down left the stored image too little room to rotate in
        error = abs(stored / context / target - 1)
        if error < MAX_SCALE_ERROR:
            return Geometry(size=size, crop=crop_px, context_crop=context, stored_size=stored)
        if best is None or error < best[0]:
            best = (error, context, stored)
    if best is None:
        raise ValueError(f"no context margin fits size {size} inside a {reference_px} px image; "
                         f"lower --max-rotation-deg")
    _, context, stored = best
    return Geometry(size=size, crop=crop_px, context_crop=context, stored_size=stored)
