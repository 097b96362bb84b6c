"""The torch backend's compiled form (the torch_planes module): the eager formulation's results, fewer passes.

What decides its speed on a GPU is checked here on the CPU from the code Inductor generates (kernels and the bytes
of the buffers it allocates), never by a timer."""
import itertools
import json

import kornia
import pytest
import torch

from tests.train_helpers import FORBIDDEN, RecordOps
from train.augment import AugParams, GpuAugment, torch_backend, torch_planes
from train.bench import kernels

MEAN, STD = [0.4, 0.3, 0.5], [0.2, 0.25, 0.3]


def _augment(size=24, stored=32, **kw):
    return GpuAugment(size, stored, mean=MEAN, std=STD, backend="torch", **kw)


def _images(n, stored=32, seed=0):
    images = torch.randint(0, 256, (n, 3, stored, stored), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return images.contiguous(memory_format=torch.channels_last)  # as the loader yields them


def _planes(aug, images, params, out_dtype=torch.float32):
    packed = torch_backend.pack_params(params, aug.size, aug.stored_size, first_pass=True)
    return torch_planes.apply_packed(images, packed, aug.size, aug.scale, aug.shift, out_dtype=out_dtype)


def test_hue_equals_kornias_adjust_hue_on_every_kind_of_pixel():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 16, 16, generator=gen)
    rgb[:, :, 0] = 0.0  # black
    rgb[:, :, 1] = 1.0  # white
    rgb[:, :, 2] = torch.rand(2, 1, 16, generator=gen)  # greys (no saturation)
    for i, colour in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1)]):  # sector edges
        rgb[:, :, 3, i] = torch.tensor(colour, dtype=torch.float32).view(1, 3)
    rgb[:, :, 4] = rgb[:, :, 5].roll(1, dims=1)  # ties between channels
    shift = torch.tensor([-0.1, 0.1]) * 2 * torch.pi
    expected = kornia.enhance.adjust_hue(rgb, shift)
    got = torch.stack(torch_planes.hue_planes(list(rgb.unbind(1)), shift), 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_warp_equals_affine_grid_and_grid_sample():
    aug = _augment()
    images = _images(6)
    theta = torch_backend.pack_params(aug.sample(6, torch.Generator().manual_seed(1)), aug.size,
                                      aug.stored_size)[:, torch_backend.WARP_COLUMNS]
    grid = torch.nn.functional.affine_grid(theta.view(6, 2, 3), [6, 3, aug.size, aug.size], align_corners=True)
    expected = torch.grid_sampler_2d(images.float(), grid, 0, 0, True) / 255
    got = torch.stack(torch_planes.warp_planes(images, theta, aug.size), 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,stored", [(24, 32), (48, 60)])
def test_every_order_with_geometry_equals_the_eager_formulation(size, stored):
    """Each of the 24 jitter orders on its own sample, with flips and rotation: the planes formulation (two passes,
    one mean per sample from its chain up to its contrast) gives the eager formulation's batch."""
    aug = _augment(size, stored)
    orders = torch.tensor(list(itertools.permutations(range(4))))
    n = len(orders)
    p = aug.sample(n, torch.Generator().manual_seed(size))
    p = AugParams(hflip=p.hflip, vflip=p.vflip, angle_deg=p.angle_deg, brightness=p.brightness,
                  contrast=p.contrast, saturation=p.saturation, hue=p.hue, order=orders)
    images = _images(n, stored, seed=size)
    expected = aug.apply(images, p)
    got = _planes(aug, images, p)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    diff = (got - expected).abs()
    assert diff.max() < 2e-3 and diff.mean() < 2e-5, (diff.max(), diff.mean())  # normalised units (~0.1 levels)


def test_device_part_has_no_host_wait_and_no_float64():
    aug = _augment()
    images = _images(16)
    packed = torch_backend.pack_params(aug.sample(16, torch.Generator().manual_seed(3)), aug.size, aug.stored_size,
                                       first_pass=True)  # on the host, in float64
    with RecordOps() as rec:
        torch_planes.apply_packed(images, packed, aug.size, aug.scale, aug.shift)
    assert not FORBIDDEN & set(rec.ops), FORBIDDEN & set(rec.ops)
    assert torch.float64 not in rec.output_dtypes, rec.output_dtypes


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_compile_uses_the_planes_without_graph_break(out_dtype):
    """GpuAugment.compile (what train.run --compile uses) compiles the planes form with fullgraph=True: equal to the
    eager backend, channels_last in the asked dtype, and new parameters reuse the graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tolerance = 2e-3 if out_dtype == torch.float32 else 2e-2  # bf16: 8 significant bits of values up to ~3
    eager = _augment(out_dtype=out_dtype)
    compiled = _augment(out_dtype=out_dtype).compile()
    images = _images(8)
    for seed in (2, 3):
        params = eager.sample(8, torch.Generator().manual_seed(seed))
        out = compiled.apply(images, params)
        assert out.dtype == out_dtype and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.float(), eager.apply(images, params).float(), atol=tolerance, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_inductor_fuses_the_planes_into_fewer_passes():
    """The property that decides the compiled augmentation's speed on a GPU, read from Inductor's generated code
    for the CPU: fewer kernels and fewer bytes of intermediate buffers per image than the eager formulation compiled
    (measured at 224 px: 19 -> 7 kernels, 4.6 -> 2.2 MB per image; README)."""
    images = _images(2, 32)
    stacked = kernels.measure("stacked", images, 24, torch.float32, calls=1)
    planes = kernels.measure("planes", images, 24, torch.float32, calls=1)
    assert planes["inductor_kernels"] <= 8 < stacked["inductor_kernels"], (planes, stacked)
    assert planes["intermediate_mb_per_image"] < 0.7 * stacked["intermediate_mb_per_image"], (planes, stacked)


def test_allocations_reads_inductors_buffers_and_the_returned_one():
    code = """
def call(self, args):
        buf0 = empty_strided_cpu((4, 24, 24), (576, 24, 1), torch.float32)
        buf1 = buf0; del buf0  # reuse
        buf3 = empty_strided_cuda((4, ), (1, ), torch.bfloat16)
        buf9 = empty_strided_cpu((4, 24, 24, 3), (1728, 72, 3, 1), torch.float32)
        return (reinterpret_tensor(buf9, (4, 3, 24, 24), (1728, 1, 72, 3), 0), )
"""
    assert kernels.allocations(code) == (4 * 24 * 24 * 4 + 4 * 2, 4 * 24 * 24 * 3 * 4)


def test_kernels_command_prints_every_form_and_writes_its_json(tmp_path, capsys):
    from train.bench.__main__ import main
    out = tmp_path / "kernels.json"
    assert main(["kernels", "--size", "16", "--batch-size", "2", "--calls", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {row["form"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(kernels.FORMS)
    for form in ("stacked", "planes"):
        assert rows[form]["inductor_kernels"] >= 1 and rows[form]["ms_per_image"] > 0, rows[form]
        assert kernels.FORMS[form] in printed
    assert "skipped" in rows["triton"] or "ms_per_image" in rows["triton"]
    assert main(["kernels", "--size", "1"]) == 2 and "--size" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_triton_kernels_compile_for_the_gpus_without_spilling(target):
    """The Triton backend's kernels, compiled ahead of time for an A100 / H100-H200 (no GPU needed): the CPU tests
    run them under Triton's interpreter, which accepts code the compiler may refuse; here the real compiler and
    ptxas build both for each output dtype, and neither spills registers to local memory."""
    pytest.importorskip("triton")
    from train.bench import triton_compile
    for out_dtype in triton_compile.OUT_DTYPES:
        rows = triton_compile.compile_for(target, out_dtype)
        assert [row["kernel"] for row in rows] == ["mean_kernel", "chain_kernel"]
        for row in rows:
            assert row["local_bytes"] == 0 and row["stack_bytes"] == 0, row
            assert 0 < row["registers"] <= 128, row  # 128 x 128 threads: several programs per multiprocessor
