"""The random part of the report's transforms, per batch on the batch's device: `GpuAugment`.

Training, per sample with independent parameters (torchvision semantics throughout):
    RandomHorizontalFlip(0.5), RandomVerticalFlip(0.5), RandomRotation(20) counter-clockwise, bilinear, fill 0,
    CenterCrop -> ColorJitter(brightness=0.2, contrast=1.2, saturation=1.2, hue=0.1) in a random order -> Normalize
Eval: centre crop and normalise only.

The cache stores each image with a context margin (see pipeline.config.geometry_for), so flips, rotation and the
centre crop fold into one affine matrix per image and one bilinear warp for the batch (one resampling, not three).

Parameters are drawn on the CPU (`sample`), so a seed means the same on every device, and `apply` replays them
exactly with one of two backends, both held to the same parity test against the report's CPU path:
- "torch" (the torch_backend module): batched torch/Kornia ops on any device, the same ops for every sample, no op
  that makes the host wait. Compiled (`GpuAugment.compile`), it runs the same arithmetic on three colour planes
  (the torch_planes module), which Inductor fuses into a handful of kernels instead of 19.
- "opencv" (the opencv_backend module): per image on uint8 in a thread pool, for CPU tensors. On the 2-core dev
  machine it costs ~1 ms/img per thread at 224 px, several times less than the torch backend on the same CPU (README).
- "triton" (the triton_backend module): the torch backend's arithmetic in two hand-written Triton kernels (CUDA), one
  read of the uint8 batch per pass and one write of the output; Inductor could not fuse the torch backend's chain.
"auto" picks opencv for CPU tensors and torch for any other device (triton is chosen by name until a GPU has
measured it against the compiled torch backend).

Output dtype (`out_dtype`): float32 by default; under AMP the trainer asks for the step's dtype (bf16, or fp16 where
bf16 is missing), channels_last, so the batch is written once in half the bytes and the model's first convolution
needs no cast of its own. The arithmetic stays float32 up to that last write (the parity tests hold for each dtype).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from train.augment import torch_backend, torch_planes, triton_backend
from train.augment.opencv_backend import OpenCvBackend

# 0=brightness, 1=contrast, 2=saturation, 3=hue, as in torchvision's ColorJitter.get_params
OPS = ("brightness", "contrast", "saturation", "hue")
BACKENDS = ("auto", "torch", "opencv", "triton")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class AugParams:
    """Per-sample parameters, on the CPU; factors as torchvision's functional `adjust_*` take them."""
    hflip: torch.Tensor  # (n,) bool
    vflip: torch.Tensor  # (n,) bool
    angle_deg: torch.Tensor  # (n,) float, counter-clockwise
    brightness: torch.Tensor  # (n,) float
    contrast: torch.Tensor  # (n,) float
    saturation: torch.Tensor  # (n,) float
    hue: torch.Tensor  # (n,) float, fraction of a turn
    order: torch.Tensor  # (n, 4) or (4,) long: a permutation of 0..3 (OPS)

    def __len__(self) -> int:
        return len(self.hflip)

    def orders(self) -> torch.Tensor:
        """(n, 4) whatever shape `order` was given in."""
        return self.order.expand(len(self), 4) if self.order.dim() == 1 else self.order


@dataclass(frozen=True)
class AugConfig:
    flip_p: float = 0.5
    max_rotation_deg: float = 20.0
    brightness: float = 0.2  # factor in [1 - b, 1 + b]
    contrast: float = 1.2  # factor in [max(0, 1 - c), 1 + c]
    saturation: float = 1.2
    hue: float = 0.1  # shift in [-h, h]

    def __post_init__(self):
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        for name in ("brightness", "contrast", "saturation", "max_rotation_deg"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _uniform(n: int, low: float, high: float, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


class GpuAugment(nn.Module):
    """uint8 (B, 3, S_stored, S_stored) -> normalised `out_dtype` (B, 3, S, S), on the input's device."""

    def __init__(self, size: int, stored_size: int, mean, std, config: AugConfig = AugConfig(),
                 cpu_threads: int | None = None, backend: str = "auto", out_dtype: torch.dtype = torch.float32):
        super().__init__()
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {out_dtype}")
        self.out_dtype = out_dtype
        if (stored_size - size) % 2 or stored_size < size:
            raise ValueError(f"stored_size - size must be even and >= 0, got {stored_size} - {size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.size, self.stored_size, self.config, self.backend = size, stored_size, config, backend
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        # normalisation as one multiply-add: x * scale + shift
        self.register_buffer("scale", 1 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.register_buffer("gray_weights", torch.tensor(torch_backend.GRAY_WEIGHTS).view(1, 3, 1, 1),
                             persistent=False)
        self.cpu_threads = cpu_threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        self._opencv = OpenCvBackend(size, self.cpu_threads)
        self._torch_apply = torch_backend.apply_packed  # replaced by its compiled form in compile()
        self._torch_first_pass = False  # whether _torch_apply reads the first-pass columns (the planes form does)

    @classmethod
    def from_manifest(cls, manifest: dict, size: int, config: AugConfig = AugConfig(), **kwargs) -> "GpuAugment":
        try:
            info = manifest["sizes"][str(size)]
        except KeyError:
            raise ValueError(f"size {size} is not in the cache (cached: {sorted(manifest['sizes'], key=int)})") \
                from None
        if config.max_rotation_deg > manifest["config"]["max_rotation_deg"]:
            raise ValueError(f"rotation up to {config.max_rotation_deg} degrees needs a cache built with "
                             f"--max-rotation-deg >= that (this one: {manifest['config']['max_rotation_deg']})")
        return cls(size, info["stored_size"], info["mean"], info["std"], config, **kwargs)

    @property
    def margin(self) -> int:
        return (self.stored_size - self.size) // 2

    def backend_for(self, device: torch.device) -> str:
        """The backend that `apply` uses for a batch on `device`."""
        if self.backend == "auto":
            return "opencv" if device.type == "cpu" else "torch"
        return self.backend

    def compile(self, planes: bool = True, **kwargs) -> "GpuAugment":
        """Compile the torch backend's device part with fullgraph=True and static shapes (kwargs go to torch.compile);
        returns self.

        `planes` (default): compile the planes formulation (torch_planes), the one Inductor fuses; False compiles
        the eager formulation as it is (19 kernels; kept for the benchmarks' before/after). Only the device part:
        the host-side packing and its pinned non_blocking copy stay eager (Inductor is known to miscompile a
        non_blocking copy of a CPU tensor computed inside a graph). Unlike nn.Module.compile this leaves `forward`
        as it is; the OpenCV and Triton backends (the latter fused by hand) and eval mode are not affected.
        """
        # static shapes, as the trainer's model (the trainer's COMPILE_OPTIONS): one graph per stage size
        self._torch_apply = torch.compile(torch_planes.apply_packed if planes else torch_backend.apply_packed,
                                          **{"fullgraph": True, "dynamic": False, **kwargs})
        self._torch_first_pass = planes
        return self

    # ------------------------------------------------------------------ parameters

    def sample(self, n: int, generator: torch.Generator | None = None) -> AugParams:
        """Independent parameters for n samples, drawn on the CPU (so a seed means the same on any device)."""
        c = self.config
        return AugParams(
            hflip=torch.rand(n, generator=generator) < c.flip_p,
            vflip=torch.rand(n, generator=generator) < c.flip_p,
            angle_deg=_uniform(n, -c.max_rotation_deg, c.max_rotation_deg, generator),
            brightness=_uniform(n, max(0.0, 1 - c.brightness), 1 + c.brightness, generator),
            contrast=_uniform(n, max(0.0, 1 - c.contrast), 1 + c.contrast, generator),
            saturation=_uniform(n, max(0.0, 1 - c.saturation), 1 + c.saturation, generator),
            hue=_uniform(n, -c.hue, c.hue, generator),
            order=torch.argsort(torch.rand(n, 4, generator=generator), dim=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.eval_transform(images)
        return self.apply(images, self.sample(images.shape[0]))

    # ------------------------------------------------------------------ eval

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        m, s = self.margin, self.size
        return torch.addcmul(self.shift, images[:, :, m:m + s, m:m + s].float(), self.scale / 255).to(self.out_dtype)

    # ------------------------------------------------------------------ train

    def apply(self, images: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Replay `params` on uint8 images (n, 3, S_stored, S_stored); returns `out_dtype` (n, 3, S, S) normalised,
        channels_last unless `out_dtype` is float32 (whose layout follows the input's)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (n, 3, S, S) images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[-1] != self.stored_size or images.shape[-2] != self.stored_size:
            raise ValueError(f"expected stored images of {self.stored_size} px, got {tuple(images.shape[-2:])}")
        if len(params) != images.shape[0]:
            raise ValueError(f"{len(params)} parameter sets for {images.shape[0]} images")
        backend = self.backend_for(images.device)
        if backend == "opencv":
            if images.device.type != "cpu":
                raise ValueError(f"backend 'opencv' takes CPU tensors, got a batch on {images.device}; use "
                                 f"backend='torch' or 'auto'")
            return self._apply_opencv(images, params).to(self.out_dtype)
        if backend == "triton" and not triton_backend.available(images.device):
            raise ValueError(f"backend 'triton' runs on CUDA tensors (with the triton package), got a batch on "
                             f"{images.device}; use backend='auto'")
        first_pass = backend == "triton" or self._torch_first_pass
        packed = torch_backend.to_device(
            torch_backend.pack_params(params, self.size, self.stored_size, first_pass=first_pass), images.device)
        if backend == "triton":
            return triton_backend.apply_packed(images, packed, self.size, self.scale, self.shift, self.gray_weights,
                                               self.out_dtype)
        return self._torch_apply(images, packed, self.size, self.scale, self.shift, self.gray_weights,
                                 self.out_dtype)

    def warp_matrices(self, params: AugParams) -> np.ndarray:
        """(n, 2, 3) float64 maps from output pixel (x, y) to stored-image pixel, pixel centres at integers.

        out(p) = src(c_s + F R^-1 (p - c_o)): the report flips, then rotates the flipped image counter-clockwise
        about its centre (torchvision samples at R^-1 = [[cos, -sin], [sin, cos]] in x-right, y-down pixels), then
        takes the centre crop; flip and rotation commute with the centred crop, so one map does all three.
        """
        a = params.angle_deg.numpy().astype(np.float64) * (math.pi / 180)
        cos, sin = np.cos(a), np.sin(a)
        fx = np.where(params.hflip.numpy(), -1.0, 1.0)
        fy = np.where(params.vflip.numpy(), -1.0, 1.0)
        c_o, c_s = (self.size - 1) / 2, (self.stored_size - 1) / 2
        m = np.zeros((len(params), 2, 3))
        m[:, 0, 0], m[:, 0, 1] = fx * cos, -fx * sin
        m[:, 1, 0], m[:, 1, 1] = fy * sin, fy * cos
        m[:, :, 2] = c_s - (m[:, :, 0] + m[:, :, 1]) * c_o
        return m

    def _apply_opencv(self, images: torch.Tensor, params: AugParams) -> torch.Tensor:
        factors = np.stack([getattr(params, name).numpy().astype(np.float64) for name in OPS], 1)  # (n, 4)
        return self._opencv.apply(images, self.warp_matrices(params), params.orders().numpy(), factors,
                                  self.mean.cpu().view(3).numpy().astype(np.float64),
                                  self.std.cpu().view(3).numpy().astype(np.float64))
