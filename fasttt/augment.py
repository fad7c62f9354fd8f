"""Keyed, batched augmentation on the batch's own device, in torch only.

Every random parameter of a view is a pure function of (key, sample index, view index)
through a counter-based integer hash, so the teacher-cache pass and the student's loop
compute the same pixels for a sample whatever the batch, order, process or device. The
key mixes the run's seed with the generation (`generation_key`): each generation draws
its own views, as an independent training run would.

Images arrive as uint8 NCHW canvases (fasttt/data.py). For photos, `extent` (B, 2)
gives the (height, width) region at the canvas's top-left that holds the photo; crops
are chosen in that frame. Fixed-size sources fill the canvas and pass extent=None.
"""

from __future__ import annotations

import functools
import math

import torch

from fasttt.recipe import AugmentConfig

MASK32 = 0xFFFFFFFF
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes, then centres

# Parameter streams: each random quantity of a view draws from its own stream.
STREAM_FLIP, STREAM_CROP_Y, STREAM_CROP_X = 0, 1, 2
STREAM_AREA, STREAM_RATIO = 16, 16 + RRC_ATTEMPTS

# A view's key or index: a Python int, or a 0-d int64 tensor on the images' device, which
# draws the same parameters and lets one compiled step serve every epoch and generation.
Keyed = int | torch.Tensor


def _mix32(x):
    """murmur3's 32-bit finaliser; works alike on Python ints and int64 tensors."""
    x = x & MASK32
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def generation_key(seed: int, generation: int) -> int:
    """The key of one generation's views and batch order: a 31-bit mix of seed and generation.

    31 bits, because FFCV and numba's seeding take it; the views key on it through
    `keyed_uniform`, FFCV's order on key + epoch.
    """
    return _mix32(_mix32(seed & MASK32) ^ ((generation * 0x9E3779B1 + 0x7F4A7C15) & MASK32)) \
        & 0x7FFFFFFF


def keyed_uniform(seed: Keyed, index: torch.Tensor, view: Keyed, stream: int,
                  count: int | None = None) -> torch.Tensor:
    """Uniform floats in [0, 1), float32: a pure function of (seed, index, view, stream).

    One per sample, or with `count` a (B, count) block of streams stream..stream+count-1.
    The seed and view enter as Python ints (nothing is copied to the device) or as device
    tensors (`Keyed`).
    """
    key = torch.as_tensor(index, dtype=torch.int64)
    h = _mix32(key + _mix32(seed & MASK32))
    h = _mix32(h ^ ((view * 0x9E3779B1) & MASK32))
    if count is None:
        streams = stream
    else:
        streams, h = torch.arange(stream, stream + count, device=key.device), h[:, None]
    h = _mix32(h ^ ((streams * 0x632BE5AB + 0x5851F42D) & MASK32))
    return (h >> 8).to(torch.float32) / float(1 << 24)  # 24 bits: exact in float32


def keyed_int(seed: Keyed, index: torch.Tensor, view: Keyed, stream: int,
              high: torch.Tensor) -> torch.Tensor:
    """Integers uniform in [0, high) per sample (high >= 1), keyed like `keyed_uniform`."""
    u = keyed_uniform(seed, index, view, stream)
    return torch.minimum((u * high).long(), high.long() - 1)


def _frame(images: torch.Tensor, extent: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(heights, widths) of each sample's frame as int64 tensors on the images' device."""
    batch = images.shape[0]
    if extent is None:
        height, width = images.shape[-2:]
        return (torch.full((batch,), height, device=images.device),
                torch.full((batch,), width, device=images.device))
    extent = extent.to(images.device, torch.int64)
    return extent[:, 0], extent[:, 1]


def flip_mask(seed: Keyed, index: torch.Tensor, view: Keyed) -> torch.Tensor:
    """Which samples of this view are mirrored (probability 0.5)."""
    return keyed_uniform(seed, index, view, STREAM_FLIP) < 0.5


def resized_crop_boxes(seed: Keyed, index: torch.Tensor, view: Keyed, heights: torch.Tensor,
                       widths: torch.Tensor, scale, ratio) -> torch.Tensor:
    """Integer boxes (top, left, height, width), torchvision's RandomResizedCrop rule, batched.

    Up to ten (area, aspect) draws per sample; the first that fits wins, else the
    whole frame clamped to the aspect range, centred.
    """
    heights, widths = heights.double(), widths.double()
    u_area = keyed_uniform(seed, index, view, STREAM_AREA, RRC_ATTEMPTS)
    u_ratio = keyed_uniform(seed, index, view, STREAM_RATIO, RRC_ATTEMPTS)
    area = (heights * widths)[:, None] * (scale[0] + u_area.double() * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u_ratio.double() * (log_hi - log_lo))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = fits.long().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    found = fits.any(dim=1)
    frame_ratio = widths / heights
    fallback_w = torch.where(frame_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fallback_h = torch.where(frame_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    w, h = torch.where(found, w, fallback_w).long(), torch.where(found, h, fallback_h).long()
    top = keyed_int(seed, index, view, STREAM_CROP_Y, heights.long() - h + 1)
    left = keyed_int(seed, index, view, STREAM_CROP_X, widths.long() - w + 1)
    centre_top, centre_left = (heights.long() - h) // 2, (widths.long() - w) // 2
    top, left = torch.where(found, top, centre_top), torch.where(found, left, centre_left)
    return torch.stack([top, left, h, w], dim=1)


def center_crop_boxes(heights: torch.Tensor, widths: torch.Tensor,
                      crop_ratio: float) -> torch.Tensor:
    """Centred square boxes (top, left, side, side): crop_ratio of each frame's shorter side."""
    side = torch.clamp(torch.round(torch.minimum(heights, widths).double() * crop_ratio), min=1)
    side = side.long()
    return torch.stack([(heights - side) // 2, (widths - side) // 2, side, side], dim=1)


def axis_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int,
                 device: torch.device) -> torch.Tensor:
    """(B, size, extent) resampling weights of each sample's [start, start + length) span.

    Antialiased bilinear as PIL and torchvision compute it: a triangle filter widened by
    the shrink factor, over pixel centres, renormalised within the span; when enlarging
    it is plain bilinear with half-pixel centres.
    """
    start, length = start.double()[:, None, None], length.double()[:, None, None]
    scale = length / size
    support = torch.clamp(scale, min=1.0)
    centre = start + (torch.arange(size, device=device, dtype=torch.float64)[:, None] + 0.5) * scale
    pixel = torch.arange(extent, device=device, dtype=torch.float64) + 0.5
    weights = torch.clamp(1 - ((pixel - centre) / support).abs(), min=0)
    weights = weights * ((pixel > start) & (pixel < start + length))
    return (weights / weights.sum(dim=-1, keepdim=True)).float()


def resample_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int,
                   mirror: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's box (top, left, h, w) resized to size x size, float32, maybe mirrored.

    Separable resampling as two batched matrix products (rows, then columns), so the
    work is dense and the same on every device; a mirror is the column weights reversed.
    """
    top, left, h, w = boxes.unbind(1)
    rows = axis_weights(top, h, size, images.shape[-2], images.device)
    cols = axis_weights(left, w, size, images.shape[-1], images.device)
    if mirror is not None:
        cols = torch.where(mirror[:, None, None], cols.flip(1), cols)
    source = images.to(torch.float32, memory_format=torch.contiguous_format)
    return rows[:, None] @ source @ cols.transpose(1, 2)[:, None]


def pad_crop_flip(images: torch.Tensor, seed: Keyed, index: torch.Tensor, view: Keyed,
                  pad: int, flip: bool) -> torch.Tensor:
    """Zero-pad by `pad`, take a random crop of the original size, maybe mirror; stays uint8.

    One gather: the crop offsets and the mirror are folded into the row/column indices.
    """
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    limit = torch.full((batch,), 2 * pad + 1, device=images.device)
    top = keyed_int(seed, index, view, STREAM_CROP_Y, limit)
    left = keyed_int(seed, index, view, STREAM_CROP_X, limit)
    rows = top[:, None] + torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    if flip:
        mirrored = flip_mask(seed, index, view)[:, None]
        cols = torch.where(mirrored, cols.flip(0), cols)
    cols = left[:, None] + cols
    picked = padded[torch.arange(batch, device=images.device)[:, None, None], :,
                    rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a fresh host-to-device copy each batch would stall the stream.
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    return shift, 1 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """(x / 255 - mean) / std in `dtype`, channels_last memory."""
    # A compiled step folds the constants into its graph: the cache is the eager step's
    # (and dynamo warns about tracing through one).
    affine = _affine.__wrapped__ if torch.compiler.is_compiling() else _affine
    shift, scale = affine(tuple(mean), tuple(std), images.device)
    out = (images.float() - shift) * scale
    return out.to(dtype=dtype, memory_format=torch.channels_last)


def train_view(images: torch.Tensor, index: torch.Tensor, *, seed: Keyed, view: Keyed, size: int,
               augment: AugmentConfig, extent: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """View `view` of each sample: the recipe's random crop and flip, normalised, size x size."""
    index = index.to(images.device)
    if augment.kind == "pad_crop":
        if extent is not None:
            raise ValueError("pad_crop is for fixed-size images; use resized_crop for photos")
        out = pad_crop_flip(images, seed, index, view, augment.pad, augment.flip)
        if out.shape[-1] != size or out.shape[-2] != size:
            full = torch.zeros(len(out), 4, dtype=torch.int64, device=out.device)
            full[:, 2], full[:, 3] = out.shape[-2], out.shape[-1]
            out = resample_boxes(out, full, size)
        return normalize(out, augment.mean, augment.std, dtype)
    heights, widths = _frame(images, extent)
    if augment.kind == "resized_crop":
        boxes = resized_crop_boxes(seed, index, view, heights, widths, augment.scale, augment.ratio)
    else:
        boxes = torch.stack([torch.zeros_like(heights), torch.zeros_like(widths), heights,
                             widths], dim=1)
    mirror = flip_mask(seed, index, view) if augment.flip else None
    return normalize(resample_boxes(images, boxes, size, mirror), augment.mean, augment.std, dtype)


def eval_view(images: torch.Tensor, *, size: int, augment: AugmentConfig,
              extent: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The deterministic evaluation view: a centre crop resized to size x size, normalised."""
    if extent is None and augment.eval_crop_ratio == 1 and images.shape[-2:] == (size, size):
        return normalize(images, augment.mean, augment.std, dtype)  # nothing to resample
    boxes = center_crop_boxes(*_frame(images, extent), augment.eval_crop_ratio)
    return normalize(resample_boxes(images, boxes, size), augment.mean, augment.std, dtype)


def eval_images(batch, augment: AugmentConfig, device: torch.device) -> torch.Tensor:
    """A loader batch's un-augmented evaluation view, on `device`."""
    return eval_view(batch.image.to(device, non_blocking=True), size=augment.eval_size,
                     augment=augment, extent=batch.extent)


def train_size(epoch: int, augment: AugmentConfig) -> int:
    """Progressive resizing: the train output side at `epoch` (FFCV-style linear ramp, /32)."""
    if epoch <= augment.start_ramp or augment.end_ramp == augment.start_ramp:
        return augment.min_size if epoch < augment.end_ramp else augment.max_size
    if epoch >= augment.end_ramp:
        return augment.max_size
    progress = (epoch - augment.start_ramp) / (augment.end_ramp - augment.start_ramp)
    size = augment.min_size + progress * (augment.max_size - augment.min_size)
    return max(augment.min_size, min(augment.max_size, int(round(size / 32)) * 32))
