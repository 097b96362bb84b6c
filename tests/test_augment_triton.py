"""The Triton backend of GpuAugment: the torch backend's results, two kernels, no intermediate image.

The kernel tests run on CUDA when there is one, else on the CPU under Triton's interpreter, which must be switched on
before triton is first imported (its own library functions are decorated then): `test_the_kernel_tests_pass_under_
the_interpreter` runs this file again in a child pytest with TRITON_INTERPRET=1."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from train.augment import AugParams, GpuAugment, torch_backend, triton_backend

triton = pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                             reason="runs on CUDA, or in the child pytest under Triton's interpreter")


class TensorShapes(TorchDispatchMode):
    """The shapes of the tensors every aten op run inside makes."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((tuple(t.shape), func.overloadpacket.__name__))
        return out


def _pair(size, stored, **kw):
    common = dict(mean=[0.4, 0.3, 0.5], std=[0.2, 0.25, 0.3], **kw)
    return (GpuAugment(size, stored, backend="torch", **common).to(DEVICE),
            GpuAugment(size, stored, backend="triton", **common).to(DEVICE))


def _images(n, stored, seed=0, channels_last=False):
    images = torch.randint(0, 256, (n, 3, stored, stored), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    return images.to(DEVICE)


@pytest.mark.skipif(INTERPRETED, reason="this is the parent")
def test_the_kernel_tests_pass_under_the_interpreter():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "5 passed, 2 skipped" in out, out[-2000:]  # the kernel tests ran; skipped: the parent, the CPU refusal


@kernels
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_equals_the_torch_backend_for_every_order(channels_last):
    torch_aug, triton_aug = _pair(18, 24)  # 324 output pixels: a full block and a partial one
    orders = torch.tensor(list(itertools.permutations(range(4))))
    n = len(orders)
    p = torch_aug.sample(n, torch.Generator().manual_seed(7))
    p = AugParams(p.hflip, p.vflip, p.angle_deg, p.brightness, p.contrast, p.saturation, p.hue, orders)
    images = _images(n, 24, channels_last=channels_last)
    # black, white and grey pixels: hue's special cases (no saturation, no value)
    images[0, :, :4] = 0
    images[1, :, :4] = 255
    images[2, :, :4] = 128
    expected = torch_aug.apply(images, p)
    out = triton_aug.apply(images, p)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@kernels
def test_triton_writes_the_output_dtype():
    torch_aug, triton_aug = _pair(16, 20, out_dtype=torch.bfloat16)
    images = _images(6, 20, seed=3)
    p = torch_aug.sample(6, torch.Generator().manual_seed(2))
    out = triton_aug.apply(images, p)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch_aug.apply(images, p).float(), atol=2e-2, rtol=0)


@kernels
def test_triton_makes_no_intermediate_image():
    """Two kernels and no full-size image but the output: the bytes moved per image are two reads of the uint8
    input and one write of the output (the torch backend compiled by Inductor wrote 14 float32 images)."""
    _, triton_aug = _pair(16, 20)
    images = _images(4, 20)
    p = triton_aug.sample(4)
    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    mean_kernel, chain_kernel = triton_backend.mean_kernel, triton_backend.chain_kernel
    triton_backend.mean_kernel, triton_backend.chain_kernel = Counted(mean_kernel), Counted(chain_kernel)
    try:
        with TensorShapes() as made:
            out = triton_aug.apply(images, p)
    finally:
        triton_backend.mean_kernel, triton_backend.chain_kernel = mean_kernel, chain_kernel
    assert len(launches) == 2
    images_made = [(shape, op) for shape, op in made.shapes if len(shape) == 4]
    # the output is the only image allocated, and no op computes an image (the interpreter copies its arguments)
    assert [shape for shape, op in images_made if op.startswith("empty")] == [tuple(out.shape)], images_made
    assert {op for _, op in images_made} <= {"empty", "empty_strided", "clone", "_to_copy", "copy_", "detach",
                                             "alias", "view", "_unsafe_view", "permute", "contiguous", "set_"}, images_made


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs it on the CPU")
def test_triton_on_cpu_tensors_is_refused_by_name():
    triton_aug = GpuAugment(16, 20, mean=[0.4] * 3, std=[0.2] * 3, backend="triton")
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors"):
        triton_aug.apply(images, triton_aug.sample(2))


def test_the_packed_first_pass_stops_at_each_samples_contrast():
    aug, _ = _pair(16, 20)
    orders = torch.tensor(list(itertools.permutations(range(4))))
    p = aug.sample(len(orders), torch.Generator().manual_seed(1))
    p = AugParams(p.hflip, p.vflip, p.angle_deg, p.brightness, p.contrast, p.saturation, p.hue, orders)
    packed = torch_backend.pack_params(p, aug.size, aug.stored_size, first_pass=True)
    assert torch.equal(packed[:, :torch_backend.PACKED_COLUMNS], torch_backend.pack_params(p, aug.size, aug.stored_size))
    first = packed[:, torch_backend.BEFORE_CONTRAST_COLUMNS].view(-1, 6, 2)
    blend = packed[:, torch_backend.BLEND_COLUMNS].view(-1, 6, 3)
    hue_first = packed[:, torch_backend.HUE_BEFORE_CONTRAST_COLUMN]
    for i, order in enumerate(orders.tolist()):
        before = order[:order.index(torch_backend.CONTRAST)]
        active = int(((first[i, :, 0] != 1) | (first[i, :, 1] != 0)).sum())
        assert active == len([op for op in before if op != torch_backend.HUE])  # the linear ops before contrast
        assert bool(hue_first[i]) == (torch_backend.HUE in before)
        assert not (blend[i, :, 1] != 0).sum() > 1  # one contrast slot, whose b the second pass scales the mean by
