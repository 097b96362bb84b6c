"""Preprocessing against an independent computation with plain OpenCV/numpy calls."""
import cv2
import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.preprocess import ImageError, preprocess_file, preprocess_image, read_bgr
from tests.helpers import REAL_SAMPLE, synthetic_cell


def reference_enhance(bgr, clip=3.0, tiles=9, sigma=3.0, strength=1.5):
    """The report's steps written out independently: per-channel CLAHE, float unsharp mask, BGR -> RGB."""
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    channels = cv2.split(bgr)
    eq = np.dstack([clahe.apply(c) for c in channels]).astype(np.float64)
    blur = cv2.GaussianBlur(eq.astype(np.uint8), (0, 0), sigma).astype(np.float64)
    sharp = np.clip(np.rint((1 + strength) * eq - strength * blur), 0, 255).astype(np.uint8)
    return sharp[:, :, ::-1]


def report_eval_crop(bgr, size):
    """The report's eval path: enhance, CenterCrop(270) of 450, resize to `size`."""
    rgb = reference_enhance(bgr)
    o = (450 - 270) // 2
    return cv2.resize(rgb[o:o + 270, o:o + 270], (size, size), interpolation=cv2.INTER_AREA)


def images_450():
    rng = np.random.default_rng(0)
    if REAL_SAMPLE.is_dir():
        return [cv2.imread(str(p)) for p in sorted(REAL_SAMPLE.glob("*/*.bmp"))[::16]]
    return [cv2.GaussianBlur(synthetic_cell(rng, 450, i % 2), (0, 0), 2) for i in range(4)]


@pytest.mark.parametrize("size", [64, 128, 224])
def test_stored_image_matches_an_independent_opencv_computation(size):
    config = PreprocessConfig()
    g = config.geometry(size)
    for bgr in images_450():
        stored = preprocess_image(bgr, config, (size,))[size]
        assert stored.shape == (g.stored_size, g.stored_size, 3) and stored.dtype == np.uint8
        o = (450 - g.context_crop) // 2
        expected = cv2.resize(reference_enhance(bgr)[o:o + g.context_crop, o:o + g.context_crop],
                              (g.stored_size, g.stored_size), interpolation=cv2.INTER_AREA)
        # addWeighted rounds in float32, the reference in float64: at most one level apart, rarely.
        diff = np.abs(stored.astype(int) - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        # The centre window is the report's 270 crop resized to `size`, pixel-aligned.
        m = g.margin
        center = stored[m:m + size, m:m + size].astype(float)
        assert np.abs(center - report_eval_crop(bgr, size)).mean() < 1.0


def test_several_sizes_share_one_read(tmp_path):
    path = tmp_path / "cell.bmp"
    cv2.imwrite(str(path), images_450()[0])
    config = PreprocessConfig()
    both = preprocess_file(str(path), config, (64, 128))
    assert both[64].shape[0] == config.geometry(64).stored_size
    np.testing.assert_array_equal(both[128], preprocess_file(str(path), config, (128,))[128])


def test_other_image_sizes_keep_the_crop_fraction():
    bgr = cv2.resize(images_450()[0], (150, 150), interpolation=cv2.INTER_AREA)
    out = preprocess_image(bgr, PreprocessConfig(), (32,))[32]
    assert out.shape == (PreprocessConfig().geometry(32).stored_size,) * 2 + (3,)


@pytest.mark.parametrize("make,reason", [
    (lambda p: None, "missing"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("not an image"), "not a readable image"),
    (lambda p: cv2.imwrite(str(p), np.zeros((20, 20), np.uint8)), "3 colour channels"),
])
def test_unusable_images_say_why(tmp_path, make, reason):
    path = tmp_path / "bad.bmp"
    make(path)
    with pytest.raises(ImageError, match=reason):
        read_bgr(path)


def test_truncated_bmp_is_reported(tmp_path):
    path = tmp_path / "cut.bmp"
    cv2.imwrite(str(path), images_450()[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated"):
        read_bgr(path)
