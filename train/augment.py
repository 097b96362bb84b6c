"""The random part of the report's transforms, per batch on the batch's device: `GpuAugment`.

Training, per sample with independent parameters (torchvision semantics throughout):
    RandomHorizontalFlip(0.5), RandomVerticalFlip(0.5), RandomRotation(20) counter-clockwise, bilinear, fill 0,
    CenterCrop -> ColorJitter(brightness=0.2, contrast=1.2, saturation=1.2, hue=0.1) in a random order -> Normalize
Eval: centre crop and normalise only.

The cache stores each image with a context margin (see pipeline.config.geometry_for), so flips, rotation and the
centre crop fold into one affine matrix per image and one bilinear warp for the batch (one resampling, not three).

Two implementations of `apply`, chosen by the batch's device, both checked by the same parity test against the
report's CPU path (tests/test_augment.py):
- CUDA (and any non-CPU device): batched Kornia/torch ops: `kornia.geometry.transform.warp_affine`, blends for
  brightness/contrast/saturation written as torchvision defines them (Kornia's `ColorJiggle` and its
  `adjust_brightness`/`adjust_contrast`/`adjust_saturation` use other formulas), `kornia.enhance.adjust_hue`.
- CPU: OpenCV on uint8, per image, in a thread pool. Measured on the 2-core dev machine, one thread, 224 px: the
  batched torch path costs ~6.8 ms/img, OpenCV's uint8 path ~0.95 ms (warpAffine ~0.27 ms, uint8 HSV round trip
  ~0.15 ms). The report's PIL path did hue in uint8 HSV as well.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import cv2
import kornia
import numpy as np
import torch
from torch import nn

# 0=brightness, 1=contrast, 2=saturation, 3=hue, as in torchvision's ColorJitter.get_params
OPS = ("brightness", "contrast", "saturation", "hue")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass
class AugParams:
    """Per-sample parameters; factors as torchvision's functional `adjust_*` take them."""
    hflip: torch.Tensor  # (n,) bool
    vflip: torch.Tensor  # (n,) bool
    angle_deg: torch.Tensor  # (n,) float, counter-clockwise
    brightness: torch.Tensor  # (n,) float
    contrast: torch.Tensor  # (n,) float
    saturation: torch.Tensor  # (n,) float
    hue: torch.Tensor  # (n,) float, fraction of a turn
    order: torch.Tensor  # (n, 4) or (4,) long: a permutation of 0..3 (OPS)

    def to(self, device) -> "AugParams":
        return AugParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

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
    """uint8 (B, 3, S_stored, S_stored) -> normalised float (B, 3, S, S), on the input's device."""

    def __init__(self, size: int, stored_size: int, mean, std, config: AugConfig = AugConfig(),
                 cpu_threads: int | None = None):
        super().__init__()
        if (stored_size - size) % 2 or stored_size < size:
            raise ValueError(f"stored_size - size must be even and >= 0, got {stored_size} - {size}")
        self.size, self.stored_size, self.config = size, stored_size, config
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.cpu_threads = cpu_threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None

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
        return self._normalize(images[:, :, m:m + s, m:m + s].float().div_(255))

    # ------------------------------------------------------------------ train

    def apply(self, images: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Replay `params` on uint8 images (n, 3, S_stored, S_stored); returns float (n, 3, S, S) normalised."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (n, 3, S, S) images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[-1] != self.stored_size or images.shape[-2] != self.stored_size:
            raise ValueError(f"expected stored images of {self.stored_size} px, got {tuple(images.shape[-2:])}")
        if len(params) != images.shape[0]:
            raise ValueError(f"{len(params)} parameter sets for {images.shape[0]} images")
        if images.device.type == "cpu":
            return self._apply_opencv(images, params)
        return self._normalize(self._apply_torch(images, params.to(images.device)))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def warp_matrices(self, params: AugParams) -> torch.Tensor:
        """(n, 2, 3) float64 maps from output pixel (x, y) to stored-image pixel, pixel centres at integers.

        out(p) = src(c_s + F R^-1 (p - c_o)): the report flips, then rotates the flipped image counter-clockwise
        about its centre (torchvision samples at R^-1 = [[cos, -sin], [sin, cos]] in x-right, y-down pixels), then
        takes the centre crop; flip and rotation commute with the centred crop, so one map does all three.
        """
        a = params.angle_deg.double().cpu() * (math.pi / 180)
        cos, sin = torch.cos(a), torch.sin(a)
        fx = 1 - 2 * params.hflip.double().cpu()
        fy = 1 - 2 * params.vflip.double().cpu()
        c_o, c_s = (self.size - 1) / 2, (self.stored_size - 1) / 2
        m = torch.zeros(len(params), 2, 3, dtype=torch.float64)
        m[:, 0, 0], m[:, 0, 1] = fx * cos, -fx * sin
        m[:, 1, 0], m[:, 1, 1] = fy * sin, fy * cos
        m[:, :, 2] = c_s - (m[:, :, 0] + m[:, :, 1]) * c_o
        return m

    def _apply_torch(self, images: torch.Tensor, params: AugParams) -> torch.Tensor:
        inverse = self.warp_matrices(params)
        full = torch.cat([inverse, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(len(params), 1, 3)],
                         1)
        forward = torch.linalg.inv(full)[:, :2].to(images.device, torch.float32)  # warp_affine takes src -> dst
        x = kornia.geometry.transform.warp_affine(images.float().div_(255), forward, (self.size, self.size),
                                                  mode="bilinear", padding_mode="zeros", align_corners=True)
        orders = params.orders()
        for step in range(4):
            for op in range(4):
                idx = torch.nonzero(orders[:, step] == op).squeeze(1)
                if idx.numel():
                    x[idx] = _TORCH_OPS[op](x[idx], getattr(params, OPS[op])[idx])
        return x

    def _apply_opencv(self, images: torch.Tensor, params: AugParams) -> torch.Tensor:
        """The same transform, per image with OpenCV on uint8, normalised; for batches on the CPU."""
        hwc = images.permute(0, 2, 3, 1).numpy()  # (n, S, S, 3) view; a channels_last batch needs no copy
        warps = self.warp_matrices(params).numpy()
        orders = params.orders().numpy()
        factors = np.stack([getattr(params, name).numpy().astype(np.float64) for name in OPS], 1)  # (n, 4)
        out_hwc = np.empty((len(params), self.size, self.size, 3), np.float32)
        # Normalising per image with OpenCV while it is in cache costs ~0.14 ms; numpy broadcasting ~0.45 ms, a
        # torch pass over the batch afterwards ~0.5 ms/img (2-core dev machine, 224 px).
        scale = tuple((1 / (255 * self.std.cpu().view(3))).tolist()) + (0.0,)
        offset = tuple((-self.mean.cpu().view(3) / self.std.cpu().view(3)).tolist()) + (0.0,)

        def one(i: int) -> None:
            buf = self._scratch()
            img = cv2.warpAffine(np.ascontiguousarray(hwc[i]), warps[i], (self.size, self.size), dst=buf.a,
                                 flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                                 borderValue=0)
            for op in orders[i]:
                img = _OPENCV_OPS[op](img, factors[i, op], buf)
            cv2.multiply(img, scale, dst=buf.f, dtype=cv2.CV_32F)
            cv2.add(buf.f, offset, dst=out_hwc[i])

        if self._pool is None:
            # One image per thread; OpenCV's own per-call threads would only contend with ours (process-wide).
            cv2.setNumThreads(1)
            self._pool = ThreadPoolExecutor(self.cpu_threads, thread_name_prefix="augment")
        list(self._pool.map(one, range(len(params))))
        return torch.from_numpy(out_hwc).permute(0, 3, 1, 2)  # (n, 3, S, S) float, channels_last in memory

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None  # threads and thread-locals do not copy or pickle; they are made again on use
        state.pop("_local", None)
        return state

    def _scratch(self) -> "_Scratch":
        """This thread's buffers. Reusing them matters: fresh ~150 KB arrays per op in a worker thread cost
        page faults in glibc's per-thread arenas, 2.1 against 0.95 ms/img (2-core dev machine, 224 px)."""
        local = self.__dict__.setdefault("_local", threading.local())
        if getattr(local, "scratch", None) is None or local.scratch.a.shape[0] != self.size:
            local.scratch = _Scratch(self.size)
        return local.scratch


class _Scratch:
    def __init__(self, size: int):
        self.a = np.empty((size, size, 3), np.uint8)
        self.b = np.empty((size, size, 3), np.uint8)
        self.gray = np.empty((size, size), np.uint8)
        self.gray3 = np.empty((size, size, 3), np.uint8)
        self.f = np.empty((size, size, 3), np.float32)

    def other(self, img: np.ndarray) -> np.ndarray:
        """The uint8 buffer `img` is not in, to write an op's result to."""
        return self.b if img is self.a else self.a


# ---------------------------------------------------------------------- colour ops, torchvision semantics


def _factor(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.dtype).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _factor(f, x)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def torch_brightness(x, f):
    return _blend(x, torch.zeros_like(x[:, :1]), f)


def torch_contrast(x, f):
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)


def torch_saturation(x, f):
    return _blend(x, _gray(x), f)


def torch_hue(x, f):
    return kornia.enhance.adjust_hue(x, f.to(x.dtype) * (2 * math.pi))


_TORCH_OPS = (torch_brightness, torch_contrast, torch_saturation, torch_hue)


def cv_brightness(img: np.ndarray, f: float, buf: _Scratch) -> np.ndarray:
    # saturating and rounded, as PIL's ImageEnhance.Brightness on uint8
    return cv2.convertScaleAbs(img, dst=buf.other(img), alpha=f)


def cv_contrast(img: np.ndarray, f: float, buf: _Scratch) -> np.ndarray:
    mean = float(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY, dst=buf.gray).mean())
    return cv2.addWeighted(img, f, img, 0.0, (1 - f) * mean, dst=buf.other(img))


def cv_saturation(img: np.ndarray, f: float, buf: _Scratch) -> np.ndarray:
    cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY, dst=buf.gray), cv2.COLOR_GRAY2RGB, dst=buf.gray3)
    return cv2.addWeighted(img, f, buf.gray3, 1 - f, 0.0, dst=buf.other(img))


def cv_hue(img: np.ndarray, f: float, buf: _Scratch) -> np.ndarray:
    # Full-range uint8 HSV (H in 0..255), as PIL's HSV mode that torchvision's adjust_hue uses on PIL images.
    shift = int(f * 255) % 256  # truncated like torchvision on PIL
    if shift == 0:
        return img  # the uint8 HSV round trip alone is lossy (up to ~8 levels on dark saturated pixels)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL, dst=buf.gray3)
    hsv[:, :, 0] += np.uint8(shift)  # uint8 addition wraps around the hue circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL, dst=buf.other(img))


_OPENCV_OPS = (cv_brightness, cv_contrast, cv_saturation, cv_hue)
