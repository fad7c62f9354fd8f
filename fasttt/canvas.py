"""FFCV decoders that place each photo, whole and unresampled, on a fixed square canvas.

Crops are chosen later, on the device, inside the photo's extent on the canvas, so the
only resampling a pixel ever sees is the device-side crop-and-resize (antialiased). A
photo larger than the canvas is shrunk to fit, aspect kept: by libjpeg-turbo's fast
power-of-two DCT scaling where that suffices, then an area resize. Only the extent and
a one-pixel replicated border are written (see `place_top_left`); the rest of the
canvas is undefined and must not be read.

The device is sent only what is written: FFCV's threads pack each batch's photos, each
with its border and at its own row pitch, one after another (`block_shape`), and FFCV
copies the packed bytes alone (a 400x350 photo: 0.42 MB instead of a 512 canvas's
0.79 MB); `unpack_canvases` lays them out as canvases on the device, in one gather.
"""

from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from numba import get_num_threads, get_thread_id

UINT8 = np.dtype("<u1")
JPG = IMAGE_MODES["jpg"]  # FFCV's mode of a sample stored as JPEG

# libc's memcpy, called from numba code: numba's array slice assignment is a scalar loop
# that costs nearly as much as the JPEG decode itself.
_memcpy = ctypes.CDLL(None).memcpy
_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcpy.restype = ctypes.c_void_p


def decoded_on_device(sample, mode, gpu_percent):
    """Whether data.decode = "gpu" leaves a sample (stored in FFCV's image `mode`) to the
    device's decoder: a JPEG whose index falls in `gpu_percent` of each hundred.

    By index, never by load, so that a sample sees one decoder all run. Elementwise on
    arrays too (numpy's & of the two), and compiled into FFCV's decoders by numba.
    """
    return (mode == JPG) & (sample % 100 < gpu_percent)


def fit_extent(height, width, canvas_size):
    """(height, width) a photo occupies on the canvas: its own, or shrunk to fit, aspect kept."""
    longest = max(height, width)
    if longest <= canvas_size:
        return height, width
    return max(1, height * canvas_size // longest), max(1, width * canvas_size // longest)


def gather_unit(canvas_size: int) -> int:
    """The bytes `unpack_canvases` moves at a time: 8 where a canvas row is a whole number
    of them (a side that is a multiple of 8), else 1."""
    return 8 if canvas_size % 8 == 0 else 1


def block_shape(extent_h, extent_w, canvas_size, unit, on_device):
    """(rows, pitch in bytes) of a photo's block in a packed batch: its extent and the
    border, each row padded to whole gather units (`gather_unit`), so that every row starts
    on one; nothing for a photo the device decodes."""
    if on_device:
        return 0, 0
    columns = min(extent_w + 1, canvas_size)
    return min(extent_h + 1, canvas_size), (columns * 3 + unit - 1) // unit * unit


def packed_row_bytes(canvas_size: int) -> int:
    """The bytes of one sample's row of FFCV's packed batch: a canvas, and one canvas row
    that `unpack_canvases` may read past the last block's start."""
    return (canvas_size + 1) * canvas_size * 3


def unpack_canvases(packed: torch.Tensor, blocks: torch.Tensor,
                    canvas_size: int) -> torch.Tensor:
    """(B, 3, S, S) uint8 canvases, channels_last, of a packed batch on its device.

    `packed` holds the blocks of `CanvasRGBImageDecoder` (its first rows: the bytes in
    use), `blocks` their (rows, pitch) (`CanvasBlockDecoder`). Canvas row y of a photo is
    its block's row y (the last one, its border, past the block): S x 3 bytes from where
    that row starts, gathered for every row at once, a gather unit at a time, from
    overlapping windows of the packed bytes. Beyond a photo's border a row holds whatever
    follows: undefined, as ever; so is all of a canvas whose photo the device decodes.
    """
    size, batch, unit = canvas_size, len(blocks), gather_unit(canvas_size)
    rows, pitch = blocks.to(torch.int64).unbind(1)
    sizes = rows * pitch
    starts = torch.cumsum(sizes, 0) - sizes
    canvas_row = torch.arange(size, device=packed.device)
    last_row = (rows - 1).clamp(min=0)[:, None]
    row_starts = starts[:, None] + torch.minimum(canvas_row[None], last_row) * pitch[:, None]
    words = packed.reshape(-1) if unit == 1 else packed.reshape(-1).view(torch.int64)
    windows = words.unfold(0, size * 3 // unit, 1)
    canvases = windows.index_select(0, (row_starts // unit).reshape(-1)).view(torch.uint8)
    return canvases.view(batch, size, size, 3).permute(0, 3, 1, 2)


def dct_denominator(height, width, extent_h, extent_w):
    """Largest d in (8, 4, 2, 1) such that a JPEG decoded at scale 1/d still covers its extent.

    Only power-of-two scales: libjpeg-turbo's 7/8, 3/4, ... are slower than a full decode.
    """
    for d in (8, 4, 2):
        if (height + d - 1) // d >= extent_h and (width + d - 1) // d >= extent_w:
            return d
    return 1


def place_top_left(image, block, pitch, canvas_size):
    """Copy a contiguous (h, w, 3) uint8 image into a block of `pitch`-byte rows, plus a
    replicated edge where the canvas has room.

    The row below and the column right of the image repeat its last row and column, so
    a bilinear sample anywhere inside the extent reads only defined pixels and behaves
    like a resampler that clamps at the edge. Beyond that border nothing is written:
    filling it would cost more memory traffic than the decode saves.
    """
    height, width = image.shape[0], image.shape[1]
    row = width * 3
    source, target = image.ctypes.data, block.ctypes.data
    for r in range(height):
        _memcpy(target + r * pitch, source + r * row, row)
        if width < canvas_size:
            _memcpy(target + r * pitch + row, source + r * row + row - 3, 3)
    if height < canvas_size:
        border = min(width + 1, canvas_size) * 3
        _memcpy(target + height * pitch, target + (height - 1) * pitch, border)


class CanvasRGBImageDecoder(SimpleRGBImageDecoder):
    """Photos of any size -> a packed batch of their blocks (`unpack_canvases` makes them
    canvases), each block the photo and its border.

    Returns the batch's first rows of `packed_row_bytes`, as many as its blocks fill (and
    a canvas row more), so that FFCV copies those alone to the device. The samples
    `decoded_on_device` leaves to the device under `gpu_percent` (0: none) have no block.
    Subclasses FFCV's simple decoder only because FFCV recognises a field's decoder by type.
    """

    def __init__(self, canvas_size: int, gpu_percent: int = 0):
        super().__init__()
        self.canvas_size, self.gpu_percent = canvas_size, gpu_percent

    def declare_state_and_memory(self, previous_state: State):
        heights, widths = self.metadata["height"], self.metadata["width"]
        decoded = int((heights.astype(np.uint64) * widths).max()) * 3
        too_big = max(heights.max(), widths.max()) > self.canvas_size
        shrunk = self.canvas_size**2 * 3 if too_big else 0
        self.decoded_bytes = decoded
        row = (packed_row_bytes(self.canvas_size),)
        return (
            replace(previous_state, jit_mode=True, shape=row, dtype=UINT8),
            (AllocationQuery(row, UINT8), AllocationQuery((decoded + shrunk,), UINT8)),
        )

    def generate_code(self):
        read, each = self.memory_read, Compiler.get_iterator()
        decode_jpeg, area_resize = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        extent_of, denominator = Compiler.compile(fit_extent), Compiler.compile(dct_denominator)
        place, block_of = Compiler.compile(place_top_left), Compiler.compile(block_shape)
        on_device, gpu_percent = Compiler.compile(decoded_on_device), self.gpu_percent
        size, decoded_bytes = self.canvas_size, self.decoded_bytes
        row_bytes, unit = packed_row_bytes(size), gather_unit(size)

        def decode(batch_indices, storage, metadata, storage_state):
            packed, scratch = storage
            count = len(batch_indices)
            blocks = packed.reshape(-1)
            starts = np.zeros(count + 1, np.int64)  # block i: starts[i] to starts[i + 1]
            for i in range(count):  # as CanvasBlockDecoder gives them to unpack_canvases
                field = metadata[batch_indices[i]]
                extent_h, extent_w = extent_of(np.uint32(field["height"]),
                                               np.uint32(field["width"]), size)
                rows, pitch = block_of(extent_h, extent_w, size, unit, on_device(
                    batch_indices[i], field["mode"], gpu_percent))
                starts[i + 1] = starts[i] + np.int64(rows) * np.int64(pitch)
            per_thread = count >= get_num_threads()
            for i in each(count):
                # A thread reuses one hot scratch row; FFCV's one row per sample keeps
                # pulling cold memory and costs about a fifth of the throughput.
                buffer = scratch[get_thread_id()] if per_thread else scratch[i]
                field = metadata[batch_indices[i]]
                if on_device(batch_indices[i], field["mode"], gpu_percent):
                    continue
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                extent_h, extent_w = extent_of(height, width, size)
                _, pitch = block_of(extent_h, extent_w, size, unit, False)
                if field["mode"] == JPG:
                    d = denominator(height, width, extent_h, extent_w)
                    decode_jpeg(data, buffer, height, width, height, width, 0, 0, 1, d,
                                False, False)
                    height, width = (height + d - 1) // d, (width + d - 1) // d
                    image = buffer[: height * width * 3].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                if height != extent_h or width != extent_w:
                    shrunk = buffer[decoded_bytes: decoded_bytes + extent_h * extent_w * 3]
                    shrunk = shrunk.reshape(extent_h, extent_w, 3)
                    area_resize(image, 0, height, 0, width, shrunk)
                    image = shrunk
                place(image, blocks[starts[i]: starts[i + 1]], pitch, size)
            in_use = starts[count] + size * 3  # unpack_canvases reads a canvas row past a start
            return packed[: (in_use + row_bytes - 1) // row_bytes]

        decode.is_parallel = True
        return decode


class CanvasExtentDecoder(SimpleRGBImageDecoder):
    """The (height, width) each photo occupies on the canvas of `CanvasRGBImageDecoder`."""

    def __init__(self, canvas_size: int):
        super().__init__()
        self.canvas_size = canvas_size

    def declare_state_and_memory(self, previous_state: State):
        int32 = np.dtype("<i4")
        return (replace(previous_state, jit_mode=True, shape=(2,), dtype=int32),
                AllocationQuery((2,), int32))

    def generate_code(self):
        each, extent_of = Compiler.get_iterator(), Compiler.compile(fit_extent)
        size = self.canvas_size

        def extents(batch_indices, destination, metadata, storage_state):
            for i in each(len(batch_indices)):
                field = metadata[batch_indices[i]]
                extent = extent_of(field["height"], field["width"], size)
                destination[i, 0], destination[i, 1] = extent
            return destination[: len(batch_indices)]

        extents.is_parallel = True
        return extents


class CanvasBlockDecoder(CanvasExtentDecoder):
    """The (rows, pitch) of each photo's block in the packed batch of
    `CanvasRGBImageDecoder` of the same `gpu_percent`: what `unpack_canvases` reads. Two
    int32 a sample, as the extent: only its code differs."""

    def __init__(self, canvas_size: int, gpu_percent: int = 0):
        super().__init__(canvas_size)
        self.gpu_percent = gpu_percent

    def generate_code(self):
        each, extent_of = Compiler.get_iterator(), Compiler.compile(fit_extent)
        block_of, on_device = Compiler.compile(block_shape), Compiler.compile(decoded_on_device)
        size, gpu_percent, unit = self.canvas_size, self.gpu_percent, gather_unit(self.canvas_size)

        def blocks(batch_indices, destination, metadata, storage_state):
            for i in each(len(batch_indices)):
                field = metadata[batch_indices[i]]
                extent_h, extent_w = extent_of(field["height"], field["width"], size)
                destination[i, 0], destination[i, 1] = block_of(
                    extent_h, extent_w, size, unit, on_device(batch_indices[i], field["mode"],
                                                              gpu_percent))
            return destination[: len(batch_indices)]

        blocks.is_parallel = True
        return blocks
