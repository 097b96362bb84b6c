"""The torch backend of `GpuAugment`: one batched pass on any device that never makes the host wait.

ColorJitter applies its four ops in a random order per sample; brightness, contrast and saturation are each a
blend `clamp(a * x + b * mean(gray) + c * gray)` and hue is the one op that leaves RGB. So every sample runs the same
seven slots, L L L H L L L: the ops a sample does before hue go into the three slots before H (right-aligned), the
ops after it into the three slots after H (left-aligned), and the slots a sample does not need hold the identity
blend (a=1, b=c=0, exact on [0, 1] values). Hue runs once over the batch, the per-sample order lives in the numbers
only, and there is no gather, no scatter, no `nonzero` and nothing whose shape depends on values.

The host turns each sample's parameters into 25 float32 numbers (`pack_params`): flip + rotation + centre crop as a
2x3 matrix from output to input in normalised coordinates (closed form, no inverse), the six slots' blend
coefficients and the hue shift; for the Triton backend 13 more (`first_pass=True`): the coefficients of the ops
before the sample's contrast. They reach the device in one non_blocking copy from pinned memory (`to_device`).

Measured on the 2-core dev machine (CPU tensors, `TorchDispatchMode`, README): the former path ran 743 aten ops per
batch with 16 `nonzero` calls; this one a fixed count (a test counts the aten ops under TorchDispatchMode), the same for any batch size.
"""
from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F

# Columns of the packed table: the warp (row-major 2x3), then per linear slot (a, b, c), then the hue shift.
LINEAR_SLOTS = 6  # three before hue, three after
WARP_COLUMNS = slice(0, 6)
BLEND_COLUMNS = slice(6, 6 + 3 * LINEAR_SLOTS)
HUE_COLUMN = 6 + 3 * LINEAR_SLOTS
# For the Triton backend's first pass (the chain up to each sample's contrast, whose mean grey level it needs): per
# slot (a, c) of the ops before the sample's contrast (identity from its contrast on), and 1.0 when its hue comes
# before its contrast. This backend computes the mean in the contrast's own slot instead.
BEFORE_CONTRAST_COLUMNS = slice(HUE_COLUMN + 1, HUE_COLUMN + 1 + 2 * LINEAR_SLOTS)
HUE_BEFORE_CONTRAST_COLUMN = BEFORE_CONTRAST_COLUMNS.stop
PACKED_COLUMNS = HUE_COLUMN + 1  # the table this backend reads
FIRST_PASS_COLUMNS = HUE_BEFORE_CONTRAST_COLUMN + 1  # with the first pass's columns (the Triton backend's table)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter op numbers
# Step of the order that each linear slot takes, relative to the sample's hue step k: k-3, k-2, k-1 | k+1, k+2, k+3
_SLOT_OFFSETS = (-3, -2, -1, 1, 2, 3)


def pack_params(params, size: int, stored_size: int, first_pass: bool = False) -> torch.Tensor:
    """(n, PACKED_COLUMNS) float32 on the CPU: what the device needs of `params` (AugParams), computed on the host
    in float64; with `first_pass`, (n, FIRST_PASS_COLUMNS): the Triton backend's first-pass columns too (host work
    per batch that this backend does not need).

    Warp: output pixel p and stored pixel q, pixel centres at integers, c_o = (size-1)/2, c_s = (stored-1)/2:
    q - c_s = F R^-1 (p - c_o), with F = diag(fx, fy) the flips and R^-1 = [[cos, -sin], [sin, cos]] (torchvision's
    counter-clockwise rotation sampled from the output). In align_corners=True normalised coordinates u = (p-c)/c
    this is u_s = (c_o / c_s) F R^-1 u_o: no translation, and no inverse anywhere.
    """
    n = len(params)
    angle_rad = params.angle_deg.double() * (math.pi / 180)
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    k = (size - 1) / (stored_size - 1) if stored_size > 1 else 1.0
    fx = torch.where(params.hflip, -k, k)
    fy = torch.where(params.vflip, -k, k)
    zero = torch.zeros(n, dtype=torch.float64)
    warp = torch.stack([fx * cos, -fx * sin, zero, fy * sin, fy * cos, zero], 1)  # (n, 6)

    order = params.orders()  # (n, 4): op number at each step
    factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue], 1).double()
    hue_step = (order == HUE).int().argmax(1, keepdim=True)  # (n, 1)
    step = hue_step + torch.tensor(_SLOT_OFFSETS)  # (n, 6): the step each slot takes, if within 0..3
    used = (step >= 0) & (step <= 3)
    op = order.gather(1, step.clamp(0, 3))
    f = factors.gather(1, op)
    a = torch.where(used, f, 1.0)
    b = torch.where(used & (op == CONTRAST), 1 - f, 0.0)
    c = torch.where(used & (op == SATURATION), 1 - f, 0.0)
    blend = torch.stack([a, b, c], 2).view(n, 3 * LINEAR_SLOTS)  # slot-major: a0 b0 c0 a1 b1 c1 ...
    hue_rad = factors[:, HUE:] * (2 * math.pi)
    if not first_pass:
        return torch.cat([warp, blend, hue_rad], 1).float()
    contrast_step = (order == CONTRAST).int().argmax(1, keepdim=True)  # (n, 1)
    before = used & (step < contrast_step)  # the slots of the ops before the sample's contrast
    first_pass = torch.stack([torch.where(before, a, 1.0), torch.where(before, c, 0.0)], 2).view(n, 2 * LINEAR_SLOTS)
    hue_before = (hue_step < contrast_step).double()
    return torch.cat([warp, blend, hue_rad, first_pass, hue_before], 1).float()


def to_device(packed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy of the packed table to `device` that does not make the host wait.

    From pinned memory a non_blocking copy is queued on the stream and returns at once; PyTorch's caching host
    allocator keeps the pinned block until the copy has run, so a fresh `pin_memory()` per batch is safe and cheap.
    Under torch.compile the copy stays a plain one: Inductor (torch 2.14) is known to miscompile a non_blocking copy
    of a CPU tensor computed inside the graph (see kornia.core.utils._to_device_nonblocking), and on CUDA the
    compiled part is `apply_packed` alone (GpuAugment.compile), so this runs eagerly there.
    """
    if device.type == "cpu":
        return packed
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return packed.pin_memory().to(device, non_blocking=True)
    return packed.to(device)


def apply_packed(images: torch.Tensor, packed: torch.Tensor, size: int, scale: torch.Tensor,
                 shift: torch.Tensor, gray_weights: torch.Tensor,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, S, S) + packed (B, PACKED_COLUMNS) on one device -> normalised `out_dtype` (B, 3, size, size).

    A half-precision `out_dtype` (the AMP step's) is written channels_last by the last op itself: compiled, the
    cast and the layout fold into the normalisation's kernel, so the batch is written once, in half the bytes.

    `scale` = 1 / std and `shift` = -mean / std, (1, 3, 1, 1): normalisation as one multiply-add. `gray_weights`
    (1, 3, 1, 1) = GRAY_WEIGHTS, already on the device: a tensor made here from Python numbers would be a blocking
    copy from pageable memory on every batch.
    """
    n = images.shape[0]
    theta = packed[:, WARP_COLUMNS].view(n, 2, 3)
    blend = packed[:, BLEND_COLUMNS].view(n, LINEAR_SLOTS, 3, 1, 1, 1)
    # One bilinear resampling for flips, rotation and the centre crop; fill 0 outside, as torchvision's rotate.
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=True)
    # F.grid_sample would pick cuDNN's sampler on CUDA (bilinear, zeros, align_corners), which has no fake kernel:
    # torch.compile cannot trace it with symbolic sizes, so the second stage's recompile failed with fullgraph=True.
    # grid_sampler_2d (interpolation 0 = bilinear, padding 0 = zeros) is the same op, traceable, any strides.
    x = torch.grid_sampler_2d(images.float(), grid, 0, 0, True)
    x = x * (1 / 255)  # after the warp: fewer pixels than before it
    for slot in range(LINEAR_SLOTS):
        if slot == LINEAR_SLOTS // 2:
            x = kornia.enhance.adjust_hue(x, packed[:, HUE_COLUMN])
        a, b, c = blend[:, slot].unbind(1)  # each (B, 1, 1, 1)
        gray = (x * gray_weights).sum(1, keepdim=True)  # (B, 1, H, W)
        # brightness: a=f; contrast: a=f, b=1-f (blend with the mean gray level); saturation: a=f, c=1-f (with gray)
        x = torch.addcmul(b * gray.mean((2, 3), keepdim=True) + c * gray, a, x).clamp_(0, 1)
    out = torch.addcmul(shift, x, scale)
    if out_dtype == torch.float32:
        return out
    return out.to(dtype=out_dtype, memory_format=torch.channels_last)
