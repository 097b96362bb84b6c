"""The preprocessing parameters: one frozen value, the single source of truth.

Everything that changes a cached pixel, label or split lives here, and the cache key is a hash of
`PreprocessConfig.as_dict()` plus the source fingerprint, so a changed parameter can never reuse a stale cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass

FORMAT_VERSION = 1
# stored_size / context_crop may differ from size / crop by this fraction (0.1%: under 0.15 px at a 224 px edge).
MAX_SCALE_ERROR = 1e-3

# Limits of the parameters, checked once when a config is made (so a bad flag stops the build before any image is
# read). Each bound is where a larger value stops meaning anything or costs without limit:
MAX_CLAHE_CLIP = 256.0  # OpenCV clips at clip * tile_area / 256 counts; from 256 up no bin is ever clipped
MAX_CLAHE_TILES = 64  # 7 px tiles at 450 px: finer grids equalise noise, and the cost grows with the tile count
MAX_UNSHARP_SIGMA_PX = 100.0  # its 601 px Gaussian kernel already spans a 450 px image; cost grows with sigma
MAX_UNSHARP_STRENGTH = 100.0  # far past any useful sharpening (at 10 most edges saturate)
MAX_ROTATION_DEG = 45.0  # exclusive: geometry_for sizes the margin at the largest angle, covering all smaller ones
# only while crop * (cos a + sin a) grows with the angle, i.e. below 45 degrees
# Largest output size even with upscaling allowed: its stored image (~5,300 px with the rotation margin) is ~84 MB.
MAX_SIZE_PX = 4096


def flag_of(name: str) -> str:
    """The build flag of a config field: `unsharp_sigma` -> `--unsharp-sigma`."""
    return "--" + name.replace("_", "-")


def _number(name: str, value, integer: bool) -> int | float:
    """`value` as a finite int or float, or a ValueError naming the flag (a bool is not a number here)."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{flag_of(name)} ({name}) must be {'a whole number' if integer else 'a number'}, "
                         f"got {value!r}")
    value = int(value) if integer else float(value)
    if not math.isfinite(value):
        raise ValueError(f"{flag_of(name)} ({name}) must be a finite number, got {value!r}")
    return value


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
        """Check every field once, naming its flag and the bad value; store ints as int and floats as float.

        The normalised types keep the digest stable (3 and 3.0 give the same key; numpy scalars become JSON-able).
        """
        integers = {"clahe_tiles", "crop_px", "reference_px", "split_seed", "shard_size"}
        for name in ("clahe_clip", "clahe_tiles", "unsharp_sigma", "unsharp_strength", "crop_px", "reference_px",
                     "max_rotation_deg", "split_seed", "shard_size"):
            object.__setattr__(self, name, _number(name, getattr(self, name), name in integers))
        object.__setattr__(self, "split_fractions", _fractions(self.split_fractions))
        checks = [
            ("clahe_clip", 0 < self.clahe_clip <= MAX_CLAHE_CLIP,
             f"> 0 and <= {MAX_CLAHE_CLIP:g} (from {MAX_CLAHE_CLIP:g} up nothing is clipped)"),
            ("clahe_tiles", 1 <= self.clahe_tiles <= MAX_CLAHE_TILES, f"from 1 to {MAX_CLAHE_TILES}"),
            ("unsharp_sigma", 0 < self.unsharp_sigma <= MAX_UNSHARP_SIGMA_PX,
             f"> 0 and <= {MAX_UNSHARP_SIGMA_PX:g} px"),
            ("unsharp_strength", 0 <= self.unsharp_strength <= MAX_UNSHARP_STRENGTH,
             f">= 0 and <= {MAX_UNSHARP_STRENGTH:g}"),
            ("reference_px", self.reference_px >= 1, ">= 1 px"),
            ("crop_px", 1 <= self.crop_px <= self.reference_px,
             f"from 1 to --reference-px ({self.reference_px}) px"),
            ("max_rotation_deg", 0 <= self.max_rotation_deg < MAX_ROTATION_DEG,
             f">= 0 and < {MAX_ROTATION_DEG:g} degrees"),
            ("split_seed", self.split_seed >= 0, ">= 0"),
            ("shard_size", self.shard_size >= 1, ">= 1 image"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{flag_of(name)} ({name}) must be {rule}, got {getattr(self, name)!r}")
        _context_range(self.crop_px, self.reference_px, self.max_rotation_deg)  # the rotation margin must fit

    def check_sizes(self, sizes, allow_upscale: bool = False) -> tuple[int, ...]:
        """The requested output sizes, sorted and without repeats, or a ValueError naming `--sizes`.

        By default a size may not exceed `crop_px`: the crop holds `crop_px` source pixels at the reference size, so
        a larger size would only enlarge them. `allow_upscale` (the build's `--allow-upscale`) lifts that limit up
        to MAX_SIZE_PX.
        """
        sizes = list(sizes)
        if not sizes:
            raise ValueError("--sizes needs at least one size in px, e.g. --sizes 128 224")
        limit = MAX_SIZE_PX if allow_upscale else min(self.crop_px, MAX_SIZE_PX)
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size <= MAX_SIZE_PX:
                raise ValueError(f"--sizes must be whole numbers of px from 1 to {MAX_SIZE_PX}, got {size!r}")
            if size > limit:
                raise ValueError(
                    f"--sizes {size} is larger than the {self.crop_px} px crop (--crop-px at --reference-px "
                    f"{self.reference_px}), so it would only enlarge the source pixels; use sizes up to "
                    f"{self.crop_px}, or pass --allow-upscale to allow sizes up to {MAX_SIZE_PX}")
        sizes = tuple(sorted({int(s) for s in sizes}))
        for size in sizes:
            self.geometry(size)
        return sizes

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


def _fractions(value) -> tuple[float, float, float]:
    """Three positive finite train/valid/test fractions summing to 1, or a ValueError naming the flag."""
    rule = "--split-fractions (split_fractions) must be three positive numbers (train valid test) summing to 1"
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{rule}, got {value!r}")
    if any(isinstance(f, bool) or not isinstance(f, numbers.Real) for f in value):
        raise ValueError(f"{rule}, got {tuple(value)!r}")
    fractions = tuple(float(f) for f in value)
    if not all(math.isfinite(f) and f > 0 for f in fractions) or abs(sum(fractions) - 1) >= 1e-6:
        raise ValueError(f"{rule}, got {fractions!r} (sum {sum(fractions):g})")
    return fractions


def _reach(px: float, max_rotation_deg: float) -> float:
    """Side of the square a `px` window rotated by up to `max_rotation_deg` (< 45) reaches, plus 1 px to sample."""
    a = math.radians(max_rotation_deg)
    return px * (math.cos(a) + math.sin(a)) + (1 if max_rotation_deg > 0 else 0)


def _context_range(crop_px: int, reference_px: int, max_rotation_deg: float) -> tuple[int, int]:
    """Smallest and largest margin k (context_crop = crop + 2k) that covers the rotation inside the image."""
    needed = _reach(crop_px, max_rotation_deg)
    k_min = max(0, math.ceil((needed - crop_px) / 2))
    k_max = (reference_px - crop_px) // 2
    if k_min > k_max:
        raise ValueError(
            f"a {crop_px} px crop rotated by {max_rotation_deg:g} degrees needs {needed:.0f} px of context, "
            f"more than the {reference_px} px image holds; lower --crop-px or --max-rotation-deg")
    return k_min, k_max


def geometry_for(size: int, crop_px: int, reference_px: int, max_rotation_deg: float) -> Geometry:
    """Pick `context_crop` and `stored_size` for one output size.

    A `crop_px` window rotated by up to `max_rotation_deg` reaches a square of side
    crop * (cos a + sin a) (~346.1 px for 270 px and 20 degrees), plus one pixel for bilinear sampling.
    Both margins must be whole and even-sided so that the centre windows stay pixel-aligned: context_crop = crop + 2k
    and stored_size = size + 2m. Among the candidates that cover the rotation we take the first k whose
    m = round(k * size / crop) gives an error in stored_size / context_crop against size / crop under
    MAX_SCALE_ERROR (the smallest such context keeps the cache small: 224 px stores 292 px), else the best one.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size <= MAX_SIZE_PX:
        raise ValueError(f"--sizes must be whole numbers of px from 1 to {MAX_SIZE_PX}, got {size!r}")
    k_min, k_max = _context_range(crop_px, reference_px, max_rotation_deg)
    stored_needed = _reach(size, max_rotation_deg)
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
