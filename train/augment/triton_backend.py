"""The Triton backend of `GpuAugment`: the torch backend's arithmetic in two hand-written passes over the batch.

Why by hand: Inductor cannot fuse the torch backend's chain. Every colour slot reads all three channels of the
previous slot's output (the grey level), so inlining six slots would recompute each pixel 4^6 times, and Inductor
writes the intermediate images out instead: compiled for the CPU (torch 2.14, batch 4 at 24 px) it materialised 14
full-size float32 images and ran 19 loop nests per batch, where the arithmetic needs two reads of the uint8 input
and one write of the output. A Triton program holds a block of pixels with their three channels in registers, so
the whole chain runs there:

1. pass 1 (`_mean_kernel`): warp (flips, rotation, centre crop: one bilinear sample of the uint8 input), each
   sample's chain up to its contrast, the grey level summed per block into a (B, blocks) table (summed in torch:
   deterministic, no atomics);
2. pass 2 (`_chain_kernel`): the warp again, the whole chain with the sample's mean grey level in its contrast
   slot, normalisation, written once in the output dtype and layout.

The per-sample numbers are the torch backend's packed table (`torch_backend.pack_params`, with the first pass's
coefficients), so both backends replay the same parameters; a test holds this one to the torch backend on the CPU
through Triton's interpreter (TRITON_INTERPRET=1). Hue follows kornia's rgb_to_hsv / hsv_to_rgb formulas.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from train.augment import torch_backend as tb

BLOCK_PIXELS = 256  # output pixels per program: 256 x 3 channels in registers


def available(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on `device`: CUDA with Triton, or any device under Triton's
    interpreter (the tests run them on the CPU that way)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


try:  # an optional dependency: torch's CUDA wheels bring it; without it this backend is unavailable
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (the dev machine has it)
    triton = None

if triton is not None:
    # Triton decides when it is imported whether kernels run compiled or interpreted (TRITON_INTERPRET=1): the tests
    # run the kernels on the CPU in a child pytest started with the variable set.
    TWO_PI: tl.constexpr = tl.constexpr(2 * math.pi)

    @triton.jit
    def warp(img_ptr, b, pix, mask, size, stored, sb, sc, sh, sw, row):
        """Bilinear sample (zeros outside) of the stored uint8 image at each output pixel's source point, as
        affine_grid + grid_sampler_2d with align_corners=True, by the 2x3 matrix at the start of the sample's packed
        `row`; (r, g, b) in [0, 1]."""
        t00 = tl.load(row + 0)
        t01 = tl.load(row + 1)
        t02 = tl.load(row + 2)
        t10 = tl.load(row + 3)
        t11 = tl.load(row + 4)
        t12 = tl.load(row + 5)
        oy = (pix // size).to(tl.float32)
        ox = (pix % size).to(tl.float32)
        step = 2.0 / (size - 1)
        xn = ox * step - 1.0
        yn = oy * step - 1.0
        gx = t00 * xn + t01 * yn + t02
        gy = t10 * xn + t11 * yn + t12
        ix = (gx + 1.0) * 0.5 * (stored - 1)
        iy = (gy + 1.0) * 0.5 * (stored - 1)
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        wx1 = ix - x0f
        wy1 = iy - y0f
        wx0 = 1.0 - wx1
        wy0 = 1.0 - wy1
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        base = img_ptr + b * sb
        r = tl.zeros_like(ix)
        g = tl.zeros_like(ix)
        bl = tl.zeros_like(ix)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                yy = y0 + dy
                xx = x0 + dx
                w = (wy1 if dy == 1 else wy0) * (wx1 if dx == 1 else wx0)
                inside = mask & (yy >= 0) & (yy < stored) & (xx >= 0) & (xx < stored)
                off = base + yy * sh + xx * sw
                r += w * tl.load(off, mask=inside, other=0).to(tl.float32)
                g += w * tl.load(off + sc, mask=inside, other=0).to(tl.float32)
                bl += w * tl.load(off + 2 * sc, mask=inside, other=0).to(tl.float32)
        return r * (1.0 / 255.0), g * (1.0 / 255.0), bl * (1.0 / 255.0)

    @triton.jit
    def hue(r, g, b, shift):
        """kornia's adjust_hue: rgb_to_hsv, hue + shift wrapped into [0, 2pi), hsv_to_rgb."""
        mx = tl.maximum(tl.maximum(r, g), b)
        mn = tl.minimum(tl.minimum(r, g), b)
        delta = mx - mn
        v = mx
        s = delta / tl.where(mx == 0, 1.0, mx + 1e-8)
        d = tl.where(delta == 0, 1.0, delta)
        rc = mx - r
        gc = mx - g
        bc = mx - b
        h1 = bc - gc
        h2 = (rc - bc) + 2.0 * d
        h3 = (gc - rc) + 4.0 * d
        h = tl.where((r >= g) & (r >= b), h1, tl.where(g >= b, h2, h3))
        h = h / d
        h = h / 6.0
        h = h - tl.floor(h)  # % 1.0, Python's sign convention
        h = TWO_PI * h
        h = tl.where(h >= TWO_PI, 0.0, h)
        h = h + shift
        h = h - TWO_PI * tl.floor(h / TWO_PI)
        h = tl.where(h >= TWO_PI, 0.0, h)
        h = h / TWO_PI
        h6 = h * 6.0
        hi = tl.floor(h6) - 6.0 * tl.floor(tl.floor(h6) / 6.0)
        f = (h6 - 6.0 * tl.floor(h6 / 6.0)) - hi
        p = v * (1.0 - s)
        q = v * (1.0 - f * s)
        t = v * (1.0 - (1.0 - f) * s)
        hi = tl.minimum(tl.maximum(hi, 0.0), 5.0)
        m0 = hi == 0
        m1 = hi == 1
        m2 = hi == 2
        m3 = hi == 3
        m4 = hi == 4
        ro = tl.where(m0, v, tl.where(m1, q, tl.where(m2, p, tl.where(m3, p, tl.where(m4, t, v)))))
        go = tl.where(m0, t, tl.where(m1, v, tl.where(m2, v, tl.where(m3, q, tl.where(m4, p, p)))))
        bo = tl.where(m0, p, tl.where(m1, p, tl.where(m2, t, tl.where(m3, v, tl.where(m4, v, q)))))
        return ro, go, bo

    @triton.jit
    def blend(r, g, b, a, bm, c, w0, w1, w2):
        """clamp(a * x + bm + c * gray(x)), bm = b * mean grey (contrast) or 0."""
        gray = r * w0 + g * w1 + b * w2
        k = bm + c * gray
        r = tl.minimum(tl.maximum(a * r + k, 0.0), 1.0)
        g = tl.minimum(tl.maximum(a * g + k, 0.0), 1.0)
        b = tl.minimum(tl.maximum(a * b + k, 0.0), 1.0)
        return r, g, b

    @triton.jit
    def warped_block(img_ptr, packed_ptr, size, stored, sb, sc, sh, sw, COLUMNS: tl.constexpr,
                     BLOCK: tl.constexpr):
        """What both passes start from: this program's sample b and block blk (grid (B, blocks)), its output pixels
        and their mask, the sample's packed row, and the warped (r, g, b) of those pixels."""
        b = tl.program_id(0)
        blk = tl.program_id(1)
        pix = blk * BLOCK + tl.arange(0, BLOCK)
        mask = pix < size * size
        row = packed_ptr + b * COLUMNS
        r, g, bl = warp(img_ptr, b, pix, mask, size, stored, sb, sc, sh, sw, row)
        return b, blk, pix, mask, row, r, g, bl

    @triton.jit
    def mean_kernel(img_ptr, packed_ptr, partial_ptr, size, stored, sb, sc, sh, sw, w0, w1, w2, blocks,
                    COLUMNS: tl.constexpr, HUE_COL: tl.constexpr, FIRST_COL: tl.constexpr,
                    HUE_FIRST_COL: tl.constexpr, BLOCK: tl.constexpr):
        b, blk, pix, mask, row, r, g, bl = warped_block(img_ptr, packed_ptr, size, stored, sb, sc, sh, sw, COLUMNS,
                                                        BLOCK)
        shift = tl.load(row + HUE_COL)
        hue_first = tl.load(row + HUE_FIRST_COL) > 0.5
        for slot in tl.static_range(6):
            if slot == 3:
                hr, hg, hb = hue(r, g, bl, shift)
                r = tl.where(hue_first, hr, r)
                g = tl.where(hue_first, hg, g)
                bl = tl.where(hue_first, hb, bl)
            r, g, bl = blend(r, g, bl, tl.load(row + FIRST_COL + 2 * slot), 0.0,
                             tl.load(row + FIRST_COL + 2 * slot + 1), w0, w1, w2)
        gray = tl.where(mask, r * w0 + g * w1 + bl * w2, 0.0)
        tl.store(partial_ptr + b * blocks + blk, tl.sum(gray, axis=0))

    @triton.jit
    def chain_kernel(img_ptr, packed_ptr, mean_ptr, shift_ptr, scale_ptr, out_ptr, size, stored, sb, sc, sh, sw,
                     ob, oc, oh, ow, w0, w1, w2, COLUMNS: tl.constexpr, BLEND_COL: tl.constexpr,
                     HUE_COL: tl.constexpr, BLOCK: tl.constexpr):
        b, _, pix, mask, row, r, g, bl = warped_block(img_ptr, packed_ptr, size, stored, sb, sc, sh, sw, COLUMNS,
                                                      BLOCK)
        mean_gray = tl.load(mean_ptr + b)
        for slot in tl.static_range(6):
            if slot == 3:
                r, g, bl = hue(r, g, bl, tl.load(row + HUE_COL))
            bm = tl.load(row + BLEND_COL + 3 * slot + 1) * mean_gray
            r, g, bl = blend(r, g, bl, tl.load(row + BLEND_COL + 3 * slot), bm,
                             tl.load(row + BLEND_COL + 3 * slot + 2), w0, w1, w2)
        oy = pix // size
        ox = pix % size
        dst = out_ptr + b * ob + oy * oh + ox * ow
        kind = out_ptr.dtype.element_ty
        tl.store(dst, (r * tl.load(scale_ptr + 0) + tl.load(shift_ptr + 0)).to(kind), mask=mask)
        tl.store(dst + oc, (g * tl.load(scale_ptr + 1) + tl.load(shift_ptr + 1)).to(kind), mask=mask)
        tl.store(dst + 2 * oc, (bl * tl.load(scale_ptr + 2) + tl.load(shift_ptr + 2)).to(kind), mask=mask)



def apply_packed(images: torch.Tensor, packed: torch.Tensor, size: int, scale: torch.Tensor, shift: torch.Tensor,
                 gray_weights: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """As `torch_backend.apply_packed`, in two kernel launches; the output is channels_last in `out_dtype`.

    The launches go to `images`' device: Triton launches on the *current* CUDA device and its current stream, which
    need not be the images' (`--device cuda:1` in one process, inline augmentation, sets no current device)."""
    with torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext():
        n, _, stored, _ = images.shape
        blocks = -(-size * size // BLOCK_PIXELS)
        w0, w1, w2 = tb.GRAY_WEIGHTS  # constants, not read back from the device
        strides = images.stride()
        partial = torch.empty((n, blocks), dtype=torch.float32, device=images.device)
        mean_kernel[(n, blocks)](images, packed, partial, size, stored, *strides, w0, w1, w2, blocks,
                                 COLUMNS=tb.FIRST_PASS_COLUMNS, HUE_COL=tb.HUE_COLUMN,
                                 FIRST_COL=tb.BEFORE_CONTRAST_COLUMNS.start,
                                 HUE_FIRST_COL=tb.HUE_BEFORE_CONTRAST_COLUMN, BLOCK=BLOCK_PIXELS)
        mean_gray = partial.sum(1) / (size * size)  # (n,): a fixed order of sums, no atomics
        out = torch.empty((n, 3, size, size), dtype=out_dtype, device=images.device,
                          memory_format=torch.channels_last)
        chain_kernel[(n, blocks)](images, packed, mean_gray, shift.reshape(3), scale.reshape(3), out, size, stored,
                                  *strides, *out.stride(), w0, w1, w2, COLUMNS=tb.FIRST_PASS_COLUMNS,
                                  BLEND_COL=tb.BLEND_COLUMNS.start, HUE_COL=tb.HUE_COLUMN, BLOCK=BLOCK_PIXELS)
        return out
