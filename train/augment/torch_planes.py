"""The torch backend's compiled form: the same arithmetic on three colour planes, written for Inductor to fuse.

Why a second formulation: the eager one (the torch_backend module) keeps the batch as one (B, 3, H, W) tensor and
computes each slot's mean grey level, and Inductor cannot fuse that chain: every slot reads all three channels of
the slot before (the grey level) and reduces over the image, so it writes the intermediate images out. Here
  - the image is three (B, H, W) planes, so each slot is elementwise on planes of one shape and the whole chain is
    one loop over the pixels;
  - the warp is written as four gathers of the uint8 input (bilinear, zeros outside, `align_corners=True`, as
    affine_grid + grid_sampler_2d), which Inductor inlines into that loop instead of materialising a grid and an
    image;
  - the one mean grey level a sample needs (its contrast's) comes from a first pass that runs the chain only up to
    the sample's contrast (the packed table's first-pass columns, as the Triton backend reads them), so the second
    pass needs no reduction;
  - hue is kornia's rgb_to_hsv / adjust_hue / hsv_to_rgb arithmetic on the planes: kornia's own function takes a
    stacked (B, 3, H, W) image (max/min over channels, a gather by the argmax) and splitting the planes for it
    broke the loop in pieces.
Measured with Inductor's generated code for the CPU (torch 2.14, one thread; `python -m train.bench kernels`,
README): the eager formulation compiles to 19 kernels, this one to 7, and runs 2.8-4x faster per image at
224 px. Eager, this formulation is the slower one (several times the aten ops, each a launch on a GPU), so
`GpuAugment` runs it only compiled (`GpuAugment.compile`).
"""
from __future__ import annotations

import math

import torch

from train.augment import torch_backend as tb

_TWO_PI = 2 * math.pi


def warp_planes(images: torch.Tensor, theta: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Bilinear sample (zeros outside) of uint8 (B, 3, S, S) `images` at each output pixel's source point by the
    (B, 6) row-major 2x3 matrices `theta` (normalised coordinates, align_corners=True); [r, g, b] (B, size, size)
    in [0, 1]. Any input strides (the loader yields channels_last)."""
    n, _, stored, _ = images.shape
    step = 2.0 / (size - 1) if size > 1 else 0.0
    lin = torch.arange(size, device=images.device, dtype=torch.float32) * step - 1.0
    xn, yn = lin.view(1, 1, size), lin.view(1, size, 1)
    t = theta.view(n, 6, 1, 1).unbind(1)
    half = 0.5 * (stored - 1)
    ix = (t[0] * xn + t[1] * yn + t[2] + 1.0) * half  # source pixel (x, y), pixel centres at integers
    iy = (t[3] * xn + t[4] * yn + t[5] + 1.0) * half
    x0, y0 = ix.floor(), iy.floor()
    wx1, wy1 = ix - x0, iy - y0
    sample = torch.arange(n, device=images.device).view(n, 1, 1)
    planes = [0.0, 0.0, 0.0]
    for dy, wy in ((0, 1.0 - wy1), (1, wy1)):
        for dx, wx in ((0, 1.0 - wx1), (1, wx1)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy <= stored - 1) & (xx >= 0) & (xx <= stored - 1)
            w = torch.where(inside, wy * wx, 0.0)
            yi, xi = yy.clamp(0, stored - 1).long(), xx.clamp(0, stored - 1).long()
            for c in range(3):
                planes[c] = planes[c] + w * images[sample, c, yi, xi].float()
    return [p * (1 / 255) for p in planes]


def blend_planes(planes: list[torch.Tensor], a, mean_term, c) -> list[torch.Tensor]:
    """clamp(a * x + mean_term + c * gray(x)) for each plane: brightness (a), contrast (mean_term = b * the mean grey
    level), saturation (c), or the identity (a=1, 0, 0); a, mean_term, c broadcast to (B, 1, 1)."""
    r, g, b = planes
    w0, w1, w2 = tb.GRAY_WEIGHTS
    k = mean_term + c * (r * w0 + g * w1 + b * w2)
    return [(a * x + k).clamp(0, 1) for x in planes]


def hue_planes(planes: list[torch.Tensor], shift_rad: torch.Tensor) -> list[torch.Tensor]:
    """kornia.enhance.adjust_hue on planes: rgb_to_hsv, hue + shift wrapped into [0, 2pi), hsv_to_rgb; kornia's
    formulas step by step (the tests hold this to kornia's function)."""
    r, g, b = planes
    mx = torch.maximum(torch.maximum(r, g), b)
    delta = mx - torch.minimum(torch.minimum(r, g), b)
    s = delta / torch.where(mx == 0, 1.0, mx + 1e-8)
    d = torch.where(delta == 0, 1.0, delta)
    rc, gc, bc = mx - r, mx - g, mx - b
    h = torch.where((r >= g) & (r >= b), bc - gc, torch.where(g >= b, (rc - bc) + 2.0 * d, (gc - rc) + 4.0 * d))
    h = h / d / 6.0
    h = _TWO_PI * (h - h.floor())  # (h / 6) % 1, Python's sign convention
    h = torch.where(h >= _TWO_PI, 0.0, h)
    h = h + shift_rad.view(-1, 1, 1)
    h = h - _TWO_PI * torch.floor(h / _TWO_PI)
    h = torch.where(h >= _TWO_PI, 0.0, h)
    h6 = h / _TWO_PI * 6.0
    sector = h6.floor() - 6.0 * torch.floor(h6.floor() / 6.0)
    f = (h6 - 6.0 * torch.floor(h6 / 6.0)) - sector
    v = mx
    p, q, t = v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s)
    sector = sector.clamp(0, 5)

    def pick(*by_sector):
        out = by_sector[5]
        for i in range(4, -1, -1):
            out = torch.where(sector == i, by_sector[i], out)
        return out

    return [pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)]


def apply_packed(images: torch.Tensor, packed: torch.Tensor, size: int, scale: torch.Tensor, shift: torch.Tensor,
                 gray_weights: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """As `torch_backend.apply_packed`, from the first-pass table (`pack_params(..., first_pass=True)`, (B,
    FIRST_PASS_COLUMNS)); the output is channels_last in `out_dtype` (the planes stacked last, then viewed as NCHW:
    no copy for the layout). `gray_weights` is not used: the weights are constants here, folded into the code."""
    n = images.shape[0]

    def column(j):
        return packed[:, j].view(n, 1, 1)

    warped = warp_planes(images, packed[:, tb.WARP_COLUMNS], size)  # both passes start from it
    # pass 1: each sample's chain up to its contrast (identity slots after it), for the mean grey level contrast uses
    x = warped
    first = tb.BEFORE_CONTRAST_COLUMNS.start
    hue_first = column(tb.HUE_BEFORE_CONTRAST_COLUMN) > 0.5
    for slot in range(tb.LINEAR_SLOTS):
        if slot == tb.LINEAR_SLOTS // 2:
            x = [torch.where(hue_first, h, p) for h, p in zip(hue_planes(x, packed[:, tb.HUE_COLUMN]), x)]
        x = blend_planes(x, column(first + 2 * slot), 0.0, column(first + 2 * slot + 1))
    w0, w1, w2 = tb.GRAY_WEIGHTS
    mean_gray = (x[0] * w0 + x[1] * w1 + x[2] * w2).mean((1, 2)).view(n, 1, 1)
    # pass 2: the whole chain, the mean in the contrast's slot (b is 0 in every other slot), normalised
    x = warped
    blend = tb.BLEND_COLUMNS.start
    for slot in range(tb.LINEAR_SLOTS):
        if slot == tb.LINEAR_SLOTS // 2:
            x = hue_planes(x, packed[:, tb.HUE_COLUMN])
        x = blend_planes(x, column(blend + 3 * slot), column(blend + 3 * slot + 1) * mean_gray,
                         column(blend + 3 * slot + 2))
    scale, shift = scale.reshape(3), shift.reshape(3)
    out = torch.stack([(x[i] * scale[i] + shift[i]).to(out_dtype) for i in range(3)], -1)  # (B, H, W, 3)
    return out.permute(0, 3, 1, 2)  # (B, 3, H, W), channels_last strides
