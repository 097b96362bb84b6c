import math

import pytest

from pipeline.config import MAX_SCALE_ERROR, PreprocessConfig


@pytest.mark.parametrize("size", [16, 32, 64, 96, 128, 160, 192, 224, 256, 320, 384])
def test_geometry_is_aligned_and_covers_the_rotation(size):
    config = PreprocessConfig()
    g = config.geometry(size)
    assert (g.stored_size - size) % 2 == 0 and (g.context_crop - g.crop) % 2 == 0
    assert abs(g.stored_size / g.context_crop / (size / g.crop) - 1) < MAX_SCALE_ERROR * 3
    a = math.radians(config.max_rotation_deg)
    assert g.context_crop >= g.crop * (math.cos(a) + math.sin(a))  # ~346.1 px for 270 and 20 degrees
    assert g.stored_size >= size * (math.cos(a) + math.sin(a))
    assert g.context_crop <= config.reference_px


def test_geometry_at_224_is_the_small_aligned_choice():
    g = PreprocessConfig().geometry(224)
    assert (g.crop, g.context_crop, g.stored_size) == (270, 352, 292)


@pytest.mark.parametrize("field,value", [
    ("clahe_clip", 4.0), ("clahe_tiles", 8), ("unsharp_sigma", 12.0), ("unsharp_strength", 5.0),
    ("crop_px", 260), ("max_rotation_deg", 15.0), ("split_seed", 1), ("shard_size", 10),
    ("split_fractions", (0.8, 0.1, 0.1)),
])
def test_every_parameter_changes_the_digest(field, value):
    base = PreprocessConfig()
    assert PreprocessConfig(**{field: value}).digest() != base.digest()
    assert PreprocessConfig.from_dict(base.as_dict()) == base


@pytest.mark.parametrize("kwargs,fragment", [
    ({"clahe_clip": 0}, "clahe_clip"), ({"crop_px": 500}, "crop_px"),
    ({"split_fractions": (0.5, 0.2, 0.2)}, "split_fractions"), ({"shard_size": 0}, "shard_size"),
])
def test_bad_parameters_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        PreprocessConfig(**kwargs)


def test_impossible_rotation_margin_is_explained():
    with pytest.raises(ValueError, match="max-rotation-deg"):
        PreprocessConfig(crop_px=440, max_rotation_deg=30).geometry(224)
