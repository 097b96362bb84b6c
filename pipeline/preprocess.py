"""The deterministic, expensive part of the report's per-image work, as pure numpy -> numpy functions.

Each function takes and returns uint8 arrays (H, W, 3); `preprocess_image` chains them the way the report did
(BGR read -> CLAHE per channel -> unsharp mask -> RGB -> centre crop -> area resize), for several sizes at once,
so an image is read and enhanced once however many sizes are cached.
"""
from __future__ import annotations

import errno
import math
import os
import stat

import cv2
import numpy as np

from pipeline.config import Geometry, PreprocessConfig


# An image's crop may be enlarged at most this many times more than the crop of a `reference_px` image is for the
# same size (for sizes up to crop_px: its crop must have at least half the output size's pixels per side). Below
# that a tiny or thumbnail file would be blown up into a blur that looks like data (a 4 px image to 224 px).
MAX_UPSCALE = 2.0


class ImageError(ValueError):
    """A source image that cannot be used; the message says why."""


def _check_file(path: str) -> None:
    """ImageError for a path that is not a readable, non-empty regular file (links followed), saying why."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.fsencode(os.readlink(path)).decode(errors="backslashreplace")
            raise ImageError(f"broken symbolic link (to {target})")
        raise ImageError("file is missing")
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageError("symbolic link loop (too many levels of symbolic links)")
        raise ImageError(f"cannot be opened ({err.strerror})")
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (a device, pipe or socket)")
    if st.st_size == 0:
        raise ImageError("file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError("cannot be opened (permission denied)")


def read_bgr(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit 3-channel image as BGR (H, W, 3) uint8, or raise ImageError with the reason."""
    path = os.fspath(path)
    _check_file(path)
    # IMREAD_UNCHANGED so a grey or 4-channel file is reported rather than silently converted.
    try:
        path.encode("utf-8")
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    except UnicodeEncodeError:  # a name that is not UTF-8 crashes cv2.imread: decode the bytes ourselves
        with open(path, "rb") as f:
            img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError("not a readable image (truncated or not an image file)")
    if img.dtype != np.uint8:
        raise ImageError(f"expected 8-bit pixels, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        channels = 1 if img.ndim == 2 else img.shape[2]
        raise ImageError(f"expected 3 colour channels, got {channels}")
    return img


def clahe_per_channel(img: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    return cv2.merge([clahe.apply(np.ascontiguousarray(img[:, :, c])) for c in range(img.shape[2])])


def unsharp_mask(img: np.ndarray, sigma: float, strength: float) -> np.ndarray:
    """(1 + strength) * img - strength * blur, saturated to uint8 (cv2.addWeighted saturates)."""
    blur = cv2.GaussianBlur(img, (0, 0), sigma)
    return cv2.addWeighted(img, 1 + strength, blur, -strength, 0)


def center_crop(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if side > min(h, w):
        raise ImageError(f"image of {w}x{h} px is smaller than the {side} px crop")
    top, left = (h - side) // 2, (w - side) // 2
    return img[top:top + side, left:left + side]


def resize_area(img: np.ndarray, side: int) -> np.ndarray:
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)


def enhance(bgr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """CLAHE then unsharp mask on the BGR image, returned as RGB (H, W, 3) uint8."""
    img = clahe_per_channel(bgr, config.clahe_clip, config.clahe_tiles)
    img = unsharp_mask(img, config.unsharp_sigma, config.unsharp_strength)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def scaled_side(side_at_reference: int, image_px: int, reference_px: int) -> int:
    """A window side for an image of another size: same fraction, same parity (so it stays centred)."""
    if image_px == reference_px:
        return side_at_reference
    side = round(side_at_reference * image_px / reference_px)
    if (image_px - side) % 2:
        side -= 1
    return max(side, 1)


def stored_image(rgb: np.ndarray, geometry: Geometry, reference_px: int) -> np.ndarray:
    """The context window of an enhanced RGB image, resized to the stored size: (S, S, 3) uint8."""
    image_px = min(rgb.shape[:2])
    context = scaled_side(geometry.context_crop, image_px, reference_px)
    return resize_area(center_crop(rgb, context), geometry.stored_size)


def _too_enlarged(image_px: int, size: int, config: PreprocessConfig) -> bool:
    crop = scaled_side(config.crop_px, image_px, config.reference_px)
    return size > MAX_UPSCALE * max(1.0, size / config.crop_px) * crop


def check_resolution(width_px: int, height_px: int, config: PreprocessConfig, sizes: tuple[int, ...]) -> None:
    """ImageError if an image this size would be enlarged more than MAX_UPSCALE times past a reference image."""
    image_px = min(width_px, height_px)
    for size in sorted(sizes, reverse=True):  # the largest size needs the largest image: name that one
        if _too_enlarged(image_px, size, config):
            crop = scaled_side(config.crop_px, image_px, config.reference_px)
            limit = MAX_UPSCALE * max(1.0, size / config.crop_px)
            # scaled_side rounds and fixes parity (up to 1.5 px off), so this side is enough for every larger image
            smallest = math.ceil((size / limit + 1.5) * config.reference_px / config.crop_px)
            raise ImageError(
                f"image of {width_px}x{height_px} px is too small for size {size}: its centre crop is {crop} px "
                f"(the {config.crop_px} px crop of a {config.reference_px} px image, scaled), which would be "
                f"enlarged {size / crop:.2f}x, more than the {limit:.2f}x allowed; use images of at least "
                f"{smallest} px or smaller --sizes")


def preprocess_image(bgr: np.ndarray, config: PreprocessConfig, sizes: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Enhance once, then cut and resize the stored window for each size."""
    h, w = bgr.shape[:2]
    check_resolution(w, h, config, sizes)
    if h != w:
        # C-NMC images are square; a non-square one is centre-cropped to a square first, like CenterCrop does.
        bgr = center_crop(bgr, min(h, w))
    rgb = enhance(bgr, config)
    return {size: stored_image(rgb, config.geometry(size), config.reference_px) for size in sizes}


def preprocess_file(path: str, config: PreprocessConfig, sizes: tuple[int, ...]) -> dict[int, np.ndarray]:
    return preprocess_image(read_bgr(path), config, sizes)
