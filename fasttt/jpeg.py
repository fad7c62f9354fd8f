"""Photo betons' JPEGs decoded on the run's device, a batch at a time (data.decode = "gpu").

The loader then carries the compressed bytes of the photos the device decodes instead of
their pixels: FFCV's threads only copy them into fixed-width rows (`JpegBytesDecoder`;
their lengths and sizes beside them, `JpegSizeDecoder`), and `DeviceJpegDecoder` decodes
them with torchvision, nvJPEG on a GPU and libjpeg-turbo on the CPU (so a CPU run, and
the tests, take the GPU's code path), then lays the photos out as fasttt/canvas.py does:
top-left, shrunk to fit, a one-pixel replicated border (zeros elsewhere where the device
decodes every photo of the batch, whatever FFCV's packing left there otherwise).

No two of these decoders give the same pixels: FFCV decodes with libjpeg-turbo's fast
DCT, torchvision's CPU decode with its accurate one, and nvJPEG upsamples chroma its own
way. So a run decodes every sample with one decoder, and `decoder_name` enters the
teacher cache's manifest: a student never learns from a teacher that saw other pixels.
Which samples the device decodes is fasttt.canvas.decoded_on_device's rule: the JPEGs in
data.gpu_decode_percent of each hundred indices. The rest, and raw samples (which have no
JPEG to decode: --write-mode raw or proportion), keep FFCV's path in the same batch: FFCV
then sends its own packed photos as well (none of the device's), and the device's photos
are placed on their canvases.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.libffcv import memcpy
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.transforms import ToTensor
from torch import Tensor
from torch.nn.functional import interpolate
from torchvision.io import ImageReadMode, decode_jpeg

from fasttt.betons import image_storage, rebuild_hint
from fasttt.canvas import decoded_on_device, fit_extent
from fasttt.errors import UserError, one_line

FFCV_DECODER = "ffcv"  # data.decode = "cpu": FFCV's threads, libjpeg-turbo's fast DCT
UINT8, INT64 = np.dtype("<u1"), np.dtype("<i8")


def decoder_name(decode: str, device: torch.device, gpu_percent: int = 100) -> str:
    """Who decodes a run's JPEGs under data.decode (and data.gpu_decode_percent) on `device`,
    as a teacher cache records it."""
    if decode != "gpu":  # "auto" stays on the CPU until nvJPEG is measured to win (unmeasured)
        return FFCV_DECODER
    kind = torch.device(device).type
    name = "nvjpeg" if kind == "cuda" else f"torchvision-{kind}"
    return name if gpu_percent == 100 else f"{name}:{gpu_percent}%+{FFCV_DECODER}"


def device_decoded(path: Path, manifest: dict, count: int,
                   gpu_percent: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of a split's samples the device decodes (`decoded_on_device`), and each one's
    stored bytes."""
    modes, stored = image_storage(path, manifest, count)
    return decoded_on_device(np.arange(count), modes, gpu_percent), stored


def device_jpeg_decoder(decode: str, gpu_percent: int, canvas_size: int | None,
                        device: torch.device, path: Path, manifest: dict,
                        count: int) -> DeviceJpegDecoder | None:
    """The device decoder of a split under data.decode and data.gpu_decode_percent, or None
    where FFCV decodes every sample (data.decode = "cpu", or no JPEG left to the device)."""
    if decoder_name(decode, device) == FFCV_DECODER:
        return None
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"data.decode = \"gpu\" decodes with nvJPEG on a CUDA device (or "
                        f"libjpeg-turbo on the CPU), not on {device.type}: set "
                        "data.decode = \"cpu\"")
    on_device, stored = device_decoded(path, manifest, count, gpu_percent)
    if not on_device.any():
        return None
    return DeviceJpegDecoder(canvas_size, device, path, manifest, int(stored[on_device].max()),
                             gpu_percent, every=bool(on_device.all()))


class JpegBytesDecoder(SimpleRGBImageDecoder):
    """Each device-decoded JPEG's compressed bytes at the start of a `width`-byte row; the
    rest of the row, and the rows of the samples FFCV decodes, are stale.

    Subclasses FFCV's simple decoder only because FFCV recognises a field's decoder by type.
    """

    def __init__(self, width: int, gpu_percent: int):
        super().__init__()
        self.width, self.gpu_percent = width, gpu_percent

    def declare_state_and_memory(self, previous_state: State):
        row = (self.width,)
        return (replace(previous_state, jit_mode=True, shape=row, dtype=UINT8),
                AllocationQuery(row, UINT8))

    def generate_code(self):
        read, each, copy = self.memory_read, Compiler.get_iterator(), Compiler.compile(memcpy)
        on_device, gpu_percent = Compiler.compile(decoded_on_device), self.gpu_percent

        def rows(batch_indices, destination, metadata, storage_state):
            for i in each(len(batch_indices)):
                field = metadata[batch_indices[i]]
                if on_device(batch_indices[i], field["mode"], gpu_percent):
                    copy(read(field["data_ptr"], storage_state), destination[i])
            return destination[: len(batch_indices)]

        rows.is_parallel = True
        return rows


class JpegSizeDecoder(SimpleRGBImageDecoder):
    """Each sample's (bytes, height, width): how much of its row to decode (0: FFCV decodes
    it), and what to expect."""

    def __init__(self, gpu_percent: int):
        super().__init__()
        self.gpu_percent = gpu_percent

    def declare_state_and_memory(self, previous_state: State):
        return (replace(previous_state, jit_mode=True, shape=(3,), dtype=INT64),
                AllocationQuery((3,), INT64))

    def generate_code(self):
        read, each = self.memory_read, Compiler.get_iterator()
        on_device, gpu_percent = Compiler.compile(decoded_on_device), self.gpu_percent

        def sizes(batch_indices, destination, metadata, storage_state):
            for i in each(len(batch_indices)):
                field = metadata[batch_indices[i]]
                destination[i, 0] = 0
                if on_device(batch_indices[i], field["mode"], gpu_percent):
                    destination[i, 0] = len(read(field["data_ptr"], storage_state))
                destination[i, 1], destination[i, 2] = field["height"], field["width"]
            return destination[: len(batch_indices)]

        sizes.is_parallel = True
        return sizes


@dataclass(eq=False)
class DeviceJpegDecoder:
    """Turns one split's batches of JPEG rows into canvases on `device`, laid out as FFCV's.

    Made by `device_jpeg_decoder` for a split the device decodes some of. Where it decodes
    all of them FFCV sends their bytes alone; otherwise FFCV sends its own photos too
    (packed, the device's left out), and the device's are placed on their canvases.
    """

    canvas_size: int | None
    device: torch.device
    path: Path
    manifest: dict
    row_width: int  # the bytes of the largest JPEG it decodes
    gpu_percent: int
    every: bool  # whether it decodes every sample (FFCV sends no canvases)
    stream: torch.cuda.Stream | None = None  # the CUDA side stream, made at the first batch

    def pipelines(self, canvases: list) -> tuple[list, dict]:
        """The image field's FFCV pipeline in place of `canvases` (FFCV's decode), and the
        pipelines to add: "jpeg_rows" (unless the image field's are the rows), "jpeg"."""
        rows = [JpegBytesDecoder(self.row_width, self.gpu_percent), ToTensor()]
        sizes = {"jpeg": PipelineSpec("image", JpegSizeDecoder(self.gpu_percent), [ToTensor()])}
        if self.every:
            return rows, sizes
        return canvases, {"jpeg_rows": PipelineSpec("image", rows[0], rows[1:]), **sizes}

    def decoded(self, fields: tuple) -> tuple:
        """A batch of the pipelines' fields as (canvases, label, index, extent)."""
        image, label, index, extent, *jpeg = fields
        rows, sizes = (image, *jpeg) if self.every else jpeg
        return self(rows, sizes, index, extent, None if self.every else image), label, index, extent

    def __call__(self, rows: Tensor, sizes: Tensor, index: Tensor, extent: Tensor,
                 canvases: Tensor | None = None) -> Tensor:
        """(B, 3, S, S) uint8 canvases on the device, channels_last, of host rows and sizes:
        new ones, or `canvases` (FFCV's) with the device's samples placed on them."""
        mine = torch.nonzero(sizes[:, 0]).flatten().tolist()  # a host tensor: no sync
        if not mine:
            return canvases
        blobs = [rows[i, :length] for i, length in zip(mine, sizes[mine, 0].tolist(),
                                                       strict=True)]
        images = self._decode(blobs, index[mine])
        for image, (_, height, width), sample in zip(images, sizes[mine].tolist(),
                                                     index[mine].tolist(), strict=True):
            # nvJPEG is lenient with damaged input: at least the size must be the stored one
            if image.shape != (3, height, width):
                raise self._damaged(sample, f"it decodes to {image.shape[1]}x{image.shape[2]} "
                                            f"pixels, not the {height}x{width} stored")
        return self._place(images, mine, extent, canvases)

    def _decode(self, blobs: list[Tensor], index: Tensor) -> list[Tensor]:
        try:
            if self.device.type == "cpu":
                return _torchvision_decode(blobs, self.device)
            return self._decode_on_side_stream(blobs)
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            # One bad image fails the whole call: find it on the CPU, where each decodes alone.
            for blob, sample in zip(blobs, index.tolist(), strict=True):
                try:
                    _torchvision_decode([blob], torch.device("cpu"))
                except RuntimeError as bad:
                    raise self._damaged(sample, f"{_reason(bad)}; the whole batch fails "
                                                "with it") from None
            samples = index.tolist()
            raise UserError(f"{decoder_name('gpu', self.device)} could not decode the batch "
                            f"of samples {samples[0]} to {samples[-1]} of {self.path}, which "
                            f"libjpeg-turbo decodes one by one ({_reason(err)}): set "
                            "data.decode = \"cpu\"") from None

    def _decode_on_side_stream(self, blobs: list[Tensor]) -> list[Tensor]:
        """nvJPEG's decode, ordered before the caller's stream.

        torchvision decodes on a private stream not ordered against the caller's (vision
        PR #9606), and the NVJPG engines ignore stream order (torchcodec PR #1634): decode
        under an idle side stream, then make the caller's stream wait for it.
        """
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            images = _torchvision_decode(blobs, self.device)
        main.wait_stream(self.stream)
        for image in images:
            image.record_stream(main)  # its memory is not reused before main is done with it
        return images

    def _place(self, images: list[Tensor], rows: list[int], extent: Tensor,
               canvases: Tensor | None) -> Tensor:
        """`images` placed on rows `rows` of `canvases`, or of new canvases of zeros."""
        size = self.canvas_size
        if canvases is None:
            target = torch.zeros((len(images), size, size, 3), dtype=torch.uint8,
                                 device=self.device)
        else:
            target = canvases.permute(0, 2, 3, 1)  # its NHWC memory, written in place
        for row, image in zip(rows, images, strict=True):
            height, width = fit_extent(image.shape[1], image.shape[2], size)
            if (height, width) != image.shape[1:]:
                # FFCV's path shrinks by DCT scaling then an area resize: close, not equal
                image = interpolate(image[None].float(), size=(height, width),
                                    mode="area")[0].round().to(torch.uint8)
            target[row, :height, :width] = image.permute(1, 2, 0)
        # every canvas's border, in one pass: FFCV's have theirs, which this writes again
        replicate_edges(target, extent)
        return target.permute(0, 3, 1, 2)

    def _damaged(self, sample: int, why: str) -> UserError:
        return UserError(f"sample {sample} of {self.path} is not a JPEG that decodes ({why}): "
                         f"the beton is damaged; {rebuild_hint(self.path.parent, self.manifest)}")


def replicate_edges(canvases: Tensor, extent: Tensor) -> None:
    """Repeat each photo's last column, then its last row, once beyond it, batched.

    As fasttt/canvas.py's place_top_left, so a bilinear crop reads the same pixels on
    either path. A photo that reaches the canvas's edge copies that column onto itself.
    """
    batch, size = canvases.shape[:2]
    samples = torch.arange(batch, device=canvases.device)[:, None]
    along = torch.arange(size, device=canvases.device)[None, :]
    height, width = (extent[:, side:side + 1].to(canvases.device, torch.int64) for side in (0, 1))
    canvases[samples, along, width.clamp(max=size - 1)] = canvases[samples, along, width - 1]
    canvases[samples, height.clamp(max=size - 1), along] = canvases[samples, height - 1, along]


def _reason(err: RuntimeError) -> str:
    """torchvision's error message without the source location it starts with."""
    return one_line(err).rsplit(", ", 1)[-1]


def _torchvision_decode(blobs: list[Tensor], device: torch.device) -> list[Tensor]:
    """(3, h, w) uint8 RGB images of JPEG bytes, decoded on `device`."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec, which fasttt does not pin
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
