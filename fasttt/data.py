"""A run's data: FFCV loaders over its betons, and which rows of them it trains on.

The loaders: train (shuffled), and sequential passes for eval and caching. The rows: the
training split's first data.train_limit, less data.holdout's keyed draw. Before a run,
`ensure_betons` builds the embedded digits if they are missing and `check_fits` refuses a
recipe these betons cannot serve. The betons themselves (the manifest's format, the checks
that make a beton safe for FFCV) are fasttt/betons.py's.

Every loader yields `Batch(image, label, index, extent)` on `device` (the CPU unless told;
`index` always stays on the host), copied there by FFCV's ToDevice on the CPU as on a GPU,
so a CPU run takes the same pipeline steps as a GPU run and fails where it would: `image` is the
uint8 canvas as an NCHW view of NHWC memory (channels_last), `label` and `index` are
int64 of shape (B,), `extent` is the region of the canvas a photo fills and None for
fixed-size sources. Random augmentation happens later on the device
(fasttt/augment.py), keyed by `index`. Photos travel packed, each with its border at its
own row pitch, and the loader's iterator lays them out as canvases on `device`
(fasttt/canvas.py); under data.decode = "gpu" FFCV sends the JPEG bytes of the photos
left to the device instead and the iterator decodes them onto the batch's canvases
(fasttt/jpeg.py): the one place every consumer's batches pass through.
FFCV reuses a few batch buffers in turn: use or copy a batch before asking for the
next few.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np
import torch
from accelerate import Accelerator
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption, epoch_iterator
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from fasttt.betons import (
    MANIFEST,
    beton_fields,
    is_photo,
    read_manifest,
    rebuild_hint,
    split_path,
    train_labels,
)
from fasttt.canvas import (
    CanvasBlockDecoder,
    CanvasExtentDecoder,
    CanvasRGBImageDecoder,
    unpack_canvases,
)
from fasttt.errors import UserError, raise_if_interrupted, signals_deferred
from fasttt.jpeg import DeviceJpegDecoder, device_jpeg_decoder
from fasttt.processes import on_main_process
from fasttt.recipe import AugmentConfig, DataConfig

READER_POLL_S = 0.5  # how often a wait for FFCV's reader thread checks that it still runs
HOLDOUT_KEY = 0x5EED_401D  # keys data.holdout's draw, the same for every run
CPU = torch.device("cpu")


class Batch(NamedTuple):
    """One loader batch; photos add `extent`, (B, 2) int (height, width) rows.

    `extent` is the top-left region of the canvas a photo occupies (its original aspect
    ratio; its original size unless it was shrunk to fit). Fixed-size sources fill the
    canvas: None.
    """

    image: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    extent: torch.Tensor | None = None


def holdout_rows(data: DataConfig, manifest: dict) -> np.ndarray:
    """The training rows set aside by data.holdout: per class, a keyed draw of that fraction.

    Keyed by a constant, not the run's seed, so every run on these betons (a teacher and
    the students of a sweep) holds out the same samples. Sorted; empty when holdout is 0.
    """
    if data.holdout == 0:
        return np.zeros(0, dtype=np.int64)
    labels = train_labels(data.beton_dir, manifest)[:train_samples(data, manifest)]
    rng = np.random.default_rng(HOLDOUT_KEY)
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rows.append(rng.permutation(members)[:round(data.holdout * len(members))])
    return np.sort(np.concatenate(rows))


def training_rows(data: DataConfig, manifest: dict) -> np.ndarray | None:
    """The rows a run trains on (and its caches label) when data.holdout sets some aside.

    None without a holdout: data.train_limit alone (the loaders' `limit`) chooses them.
    """
    if data.holdout == 0:
        return None
    return np.setdiff1d(np.arange(train_samples(data, manifest)), holdout_rows(data, manifest))


def shard_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous, disjoint slice of sample rows that `rank` owns; the slices cover all."""
    return np.array_split(np.arange(num_samples), world_size)[rank]


def _integer(to_device: list) -> list:
    return [IntDecoder(), ToTensor(), Squeeze(1), *to_device]


def _pipelines(manifest: dict, field_names: list[str], canvas_size: int | None,
               device: torch.device, jpeg: DeviceJpegDecoder | None = None) -> dict:
    """One pipeline per Batch field, in Batch order; every other beton field is skipped.

    With `jpeg`, the JPEGs it decodes come as bytes and sizes, on the host where
    torchvision reads them, in fields of its own (DeviceJpegDecoder.pipelines).
    """
    to_device = [ToDevice(torch.device(device), non_blocking=True)]
    gpu_percent = jpeg.gpu_percent if jpeg else 0
    if is_photo(manifest):
        if not canvas_size:
            raise UserError("photo betons need a canvas size (data.canvas_size, e.g. 512)")
        # packed photos, as canvases once on the device (BetonLoader)
        image = [CanvasRGBImageDecoder(canvas_size, gpu_percent), ToTensor(), *to_device]
    else:
        image = [SimpleRGBImageDecoder(), ToTensor(), *to_device,
                 ToTorchImage(channels_last=True)]
    image, for_device = jpeg.pipelines(image) if jpeg else (image, {})
    pipelines = {
        "image": image,
        "label": _integer(to_device),
        # The index stays on the host: cache lookups read rows of host memory with it, and
        # a device copy would cost them a device-to-host synchronisation every step.
        "index": _integer([]),
    }
    if is_photo(manifest):
        pipelines["extent"] = PipelineSpec("image", CanvasExtentDecoder(canvas_size),
                                           [ToTensor(), *to_device])
    if isinstance(image[0], CanvasRGBImageDecoder):  # where its packed blocks lie
        pipelines["blocks"] = PipelineSpec("image", CanvasBlockDecoder(canvas_size, gpu_percent),
                                           [ToTensor(), *to_device])
    pipelines |= for_device
    # FFCV decodes every field it is not told to skip, in an order of its own.
    return pipelines | {name: None for name in field_names if name not in pipelines}


class BetonLoader:
    """An FFCV Loader over one split whose iteration yields `Batch`es.

    With `packed_canvas` (the canvas side of photos FFCV decodes), its image field is
    photos packed as `CanvasRGBImageDecoder` packs them, unpacked here on the device; with
    `jpeg` (data.decode = "gpu"), FFCV gives the bytes of the photos it leaves to the
    device, decoded here.

    FFCV's reader refills a batch's host buffers as soon as the batch after it is taken,
    and the device copies that read them wait, on the reader's streams, for the device to
    finish older steps: a step that never waits for the device (a CUDA graph's) lets the
    host run so far ahead that the copies read the next batches' bytes. So on a GPU the
    next batch is taken only once this one's copies (and its JPEG decode) have run, and
    the index, which the step copies itself, is handed out as a copy of its own.
    """

    def __init__(self, loader: Loader, path: Path, manifest: dict, device: torch.device,
                 jpeg: DeviceJpegDecoder | None = None, packed_canvas: int | None = None):
        self.loader, self.path, self.manifest, self.jpeg = loader, path, manifest, jpeg
        self.device, self.packed_canvas = torch.device(device), packed_canvas

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch`: FFCV seeds each epoch's order with seed + epoch."""
        self.loader.next_epoch = epoch

    def __iter__(self):
        epoch = None
        try:
            _keep_reader_errors()
            # The epoch allocates the buffers its reader thread copies batches into. Made
            # inside a caller's inference mode they would be inference tensors, which the
            # reader (a thread, where that mode is off) may not write: whatever the caller's
            # mode, they are plain tensors, and a batch read under inference mode is fine.
            with signals_deferred(), torch.inference_mode(False):
                epoch = iter(self.loader)
            raise_if_interrupted()
            reading = []  # events after the device work that reads the last batch's buffers
            while True:
                for event in reading:
                    event.synchronize()
                if (taken := _next_batch(epoch, self)) is None:
                    break
                fields, reading = taken
                raise_if_interrupted()
                if self.packed_canvas:
                    image, label, index, extent, blocks, *rest = fields
                    fields = (unpack_canvases(image, blocks, self.packed_canvas), label, index,
                              extent, *rest)
                if self.jpeg is not None:
                    fields = self.jpeg.decoded(fields)
                    reading += _marked(self.jpeg.stream)
                image, label, index, *extent = fields
                yield Batch(image, label, _held(index, self.device), *extent)
        finally:
            if epoch is not None:
                with signals_deferred():  # raised at the next batch, or as the process ends
                    _stop(epoch)


def _marked(stream: torch.cuda.Stream | None) -> list[torch.cuda.Event]:
    """[an event after the work queued so far on `stream`], or [] without one (a CPU's)."""
    if stream is None:
        return []
    event = torch.cuda.Event()
    event.record(stream)
    return [event]


def _held(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the batch's index that outlives the reader's buffer: on a GPU in pinned
    memory from torch's caching allocator, which keeps it until the copies reading it ran."""
    return torch.empty_like(index, pin_memory=device.type == "cuda").copy_(index)


def _keep_reader_errors() -> None:
    """Have an FFCV reader thread's exception kept for its consumer, not printed to stderr.

    The reader's loop catches nothing but the end of the epoch, so its error would reach
    threading.excepthook and the consumer would only see the thread gone. Installed when an
    epoch starts rather than at import, so it wraps whichever hook is in place by then (a
    test runner's), and passes every other thread's exception on to it.
    """
    passed_on = threading.excepthook
    if getattr(passed_on, "keeps_reader_errors", False):
        return

    def keep(args) -> None:
        if isinstance(args.thread, EpochIterator):
            args.thread.error = args.exc_value  # read by _next_batch
        else:
            passed_on(args)

    keep.keeps_reader_errors = True
    threading.excepthook = keep


def _next_batch(epoch, loader: BetonLoader) -> tuple[tuple, list] | None:
    """The reader thread's next batch and the events after its device copies ([] on a
    CPU), or None at the end of the epoch.

    As FFCV's own `__next__`, but never waiting forever on a reader thread that died.
    """
    while True:
        alive = epoch.is_alive()  # before the wait: a reader that ends meanwhile left its item
        try:
            item = epoch.output_queue.get(timeout=READER_POLL_S)
        except queue.Empty:
            if alive:
                continue
            raise reader_failure(loader.path, loader.manifest,
                                 getattr(epoch, "error", None)) from None
        if item is None:
            return None
        slot, fields = item
        if not epoch_iterator.IS_CUDA:
            return fields, []
        copies = epoch.cuda_streams[slot]  # the batch's copies ran on the reader's stream
        epoch.current_stream.wait_stream(copies)
        return fields, _marked(copies)


def reader_failure(path: Path, manifest: dict, error: BaseException | None) -> UserError:
    """The one line for a reader thread that died of `error`, blaming the beton only if due.

    The beton is checked again first: damage found since it was opened is said as such,
    with the command that rebuilds it. A beton that passes was not the cause (unless it
    cannot be read at all), so rebuilding it is not advised then.
    """
    split = next(name for name, s in manifest["splits"].items() if s["file"] == path.name)
    beton_fields(path, manifest, manifest["splits"][split]["count"])  # raises if damaged
    what = "it gave no error" if error is None else (
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    if isinstance(error, MemoryError):
        return UserError(f"FFCV's reader thread ran out of memory reading {path} ({what}): "
                         "lower optim.batch_size or data.num_workers")
    if isinstance(error, OSError):
        return UserError(f"FFCV's reader thread could not read {path} ({what}): check the "
                         f"disk, then {rebuild_hint(path.parent, manifest)}")
    return UserError(f"FFCV's reader thread failed on {path}, which passes its checks, so "
                     f"rebuilding it would not help ({what}): this is a fasttt bug; please "
                     "report it with this line")


def _stop(epoch) -> None:
    """Stop the reader thread of an epoch left at any point, whatever it is waiting on.

    FFCV's reader ends an epoch with a `put` that has no timeout: left at a full queue (an
    exception or a signal in the consumer), it would wait forever, and so would a plain
    `join` (ffcv #345, #393). Draining the queue while joining lets it finish.
    """
    epoch.close()
    # A reader between batches sees the close within its put's 0.5 s timeout; draining
    # earlier would let it decode more batches into buffers the caller may still hold.
    epoch.join(timeout=2 * READER_POLL_S)
    while epoch.is_alive():
        with contextlib.suppress(queue.Empty):
            epoch.output_queue.get_nowait()
        epoch.join(timeout=READER_POLL_S / 10)


def _open(beton_dir: Path, split: str, canvas_size, device, decode: str, gpu_percent: int,
          indices=None, **loader_args) -> BetonLoader:
    manifest = read_manifest(beton_dir)
    path = split_path(beton_dir, manifest, split)
    count = manifest["splits"][split]["count"]
    field_names = beton_fields(path, manifest, count)
    if callable(indices):
        indices = indices(count)
    jpeg = device_jpeg_decoder(decode, gpu_percent, canvas_size, device, path, manifest, count)
    pipelines = _pipelines(manifest, field_names, canvas_size, device, jpeg)
    packed = "blocks" in pipelines  # FFCV decodes some photos
    # FFCV sets numba's thread count to num_workers, which numba refuses above its own
    # limit (the machine's cores): a recipe written for a GPU node still runs on a laptop.
    loader_args["num_workers"] = min(loader_args["num_workers"], numba.config.NUMBA_NUM_THREADS)
    loader = Loader(str(path), pipelines=pipelines, indices=indices, **loader_args)
    return BetonLoader(loader, path, manifest, device, jpeg, canvas_size if packed else None)


def train_loader(beton_dir: Path, *, batch_size: int, seed: int, num_workers: int = 2,
                 distributed: bool = False, os_cache: bool = True, split: str = "train",
                 canvas_size: int | None = None, device=CPU, limit: int = 0,
                 rows: np.ndarray | None = None, decode: str = "cpu",
                 gpu_percent: int = 100) -> BetonLoader:
    """Shuffled, drop_last loader; distributed=True shards it over the process group.

    `limit` > 0 keeps only the first `limit` samples (quick runs and tests); `rows`, when
    given, are the only samples read. `decode` and `gpu_percent` are data.decode's choice
    of JPEG decoder and data.gpu_decode_percent.
    """
    # QUASI_RANDOM keeps memory low when the beton is not in the page cache, but FFCV
    # does not implement it for distributed loaders.
    order = OrderOption.RANDOM if os_cache or distributed else OrderOption.QUASI_RANDOM
    loader = _open(beton_dir, split, canvas_size, device, decode, gpu_percent,
                   batch_size=batch_size, num_workers=num_workers, order=order, os_cache=os_cache,
                   distributed=distributed, seed=seed, drop_last=True,
                   indices=_indices(limit, rows))
    if len(loader) == 0:
        raise UserError(f"{beton_dir} {split} has fewer samples than one batch of {batch_size} "
                        "per process: lower the batch size")
    return loader


def sequential_loader(beton_dir: Path, *, split: str, batch_size: int, num_workers: int = 2,
                      rank: int = 0, world_size: int = 1, os_cache: bool = True,
                      canvas_size: int | None = None, device=CPU,
                      limit: int = 0, rows: np.ndarray | None = None,
                      decode: str = "cpu", gpu_percent: int = 100) -> BetonLoader:
    """In-order loader over `rank`'s disjoint slice: every sample exactly once across ranks.

    Serves evaluation and the teacher-cache pass. Unlike FFCV's distributed sampler it
    pads nothing, so no sample is seen twice and nothing needs de-duplication. `limit`,
    `rows`, `decode` and `gpu_percent` are as `train_loader`'s.
    """
    def indices(count: int) -> np.ndarray:
        chosen = np.arange(min(limit, count) if limit else count) if rows is None else rows
        return chosen[shard_indices(len(chosen), rank, world_size)]

    key = (_betons_as_found(beton_dir), split, batch_size, num_workers, rank, world_size,
           os_cache, canvas_size, str(device), limit, None if rows is None else rows.tobytes(),
           decode, gpu_percent)
    if _reused and key in _reused[-1]:
        return _reused[-1][key]
    loader = _open(beton_dir, split, canvas_size, device, decode, gpu_percent,
                   batch_size=batch_size, num_workers=num_workers,
                   order=OrderOption.SEQUENTIAL, os_cache=os_cache, indices=indices,
                   drop_last=False)
    if _reused:
        _reused[-1][key] = loader
    return loader


_reused: list[dict] = []  # the open `sequential_loaders_reused` blocks' loaders, innermost last


@contextlib.contextmanager
def sequential_loaders_reused():
    """Within the block, an in-order loader asked for again is the one built before.

    A run asks for the same passes again and again (the validation split in every
    generation, the training split for each cache build and the analysis), and each new
    FFCV loader compiles its reader and pipeline with numba: about 0.6 s on a CPU. An
    in-order pass reads the same rows in the same order every time, so nothing else changes.
    """
    _reused.append({})
    try:
        yield
    finally:
        _reused.pop()


def _betons_as_found(beton_dir: Path) -> tuple:
    """The beton folder and each file's identity: a beton rebuilt in place is a new loader."""
    folder = Path(beton_dir).resolve()
    files = sorted([folder / MANIFEST, *folder.glob("*.beton")])
    return folder, tuple((p.name, s.st_ino, s.st_size, s.st_mtime_ns)
                         for p in files if (s := p.stat()))


def _indices(limit: int, rows: np.ndarray | None):
    """FFCV's `indices` for a limit or explicit rows: None reads the whole split."""
    if rows is not None:
        return rows
    return (lambda count: np.arange(min(limit, count))) if limit else None


def train_samples(data: DataConfig, manifest: dict) -> int:
    """How many training samples a run uses: the split, or its first data.train_limit."""
    count = manifest["splits"]["train"]["count"]
    return min(data.train_limit, count) if data.train_limit else count


def _loader_settings(data: DataConfig, accelerator: Accelerator) -> dict:
    return dict(num_workers=data.num_workers, os_cache=data.os_cache,
                canvas_size=data.canvas_size or None, device=accelerator.device,
                decode=data.decode, gpu_percent=data.gpu_decode_percent)


def split_loader(data: DataConfig, accelerator: Accelerator, split: str, batch_size: int,
                 limit: int = 0, rows: np.ndarray | None = None) -> BetonLoader:
    """This process's in-order slice of a split: evaluation, analysis and the cache pass."""
    return sequential_loader(data.beton_dir, split=split, batch_size=batch_size,
                             rank=accelerator.process_index,
                             world_size=accelerator.num_processes, limit=limit, rows=rows,
                             **_loader_settings(data, accelerator))


def per_process_batch(batch_size: int, processes: int) -> int:
    """Each process's share of optim.batch_size, or a one-line refusal when it is uneven."""
    if batch_size % processes:
        raise UserError(f"optim.batch_size = {batch_size} does not divide evenly over "
                        f"{processes} processes: set optim.batch_size to a multiple of "
                        f"{processes}, e.g. {max(batch_size - batch_size % processes, processes)}")
    return batch_size // processes


def generation_loaders(data: DataConfig, batch_size: int, seed: int,
                       accelerator: Accelerator) -> tuple[BetonLoader, BetonLoader]:
    """This process's train loader (its shard, ordered by `seed`) and val loader (its slice)."""
    processes = accelerator.num_processes
    per_process = per_process_batch(batch_size, processes)
    train = train_loader(data.beton_dir, batch_size=per_process, seed=seed,
                         distributed=processes > 1, limit=data.train_limit,
                         rows=training_rows(data, read_manifest(data.beton_dir)),
                         **_loader_settings(data, accelerator))
    return train, split_loader(data, accelerator, "val", 2 * per_process)


def ensure_betons(data: DataConfig, accelerator: Accelerator,
                  build_digits: Callable[[Path], object]) -> dict:
    """The beton manifest; the embedded digits betons are built on first use, by `build_digits`.

    The entry point passes the builder (beton_builders.digits.build_digits_dir): the builders
    stand on fasttt.betons, so the library does not import them.
    """
    beton_dir = Path(data.beton_dir)
    if data.builtin == "digits" and not (beton_dir / MANIFEST).is_file():
        on_main_process(accelerator, build_digits, beton_dir)
    return read_manifest(beton_dir)


def check_fits(manifest: dict, data: DataConfig, augment: AugmentConfig, *, k: int,
               batch_size: int, processes: int) -> None:
    """Refuse, before anything is written, a recipe that cannot work on these betons."""
    for split in ("train", "val"):
        split_path(data.beton_dir, manifest, split)  # there, or a one-line refusal
    per_process_batch(batch_size, processes)
    held = len(holdout_rows(data, manifest))
    if data.holdout and not held:
        raise UserError(f"data.holdout = {data.holdout:g} sets aside no sample of the "
                        f"{train_samples(data, manifest)} training samples of "
                        f"{data.beton_dir}: raise data.holdout (it rounds per class)")
    samples = train_samples(data, manifest) - held
    if batch_size > samples:
        limited = data.train_limit and samples + held == data.train_limit
        why = [f"data.train_limit = {data.train_limit}"] if limited else []
        why += [f"less the {held} held out by data.holdout"] if held else []
        limit = f" ({', '.join(why)})" if why else ""
        fits = samples - samples % processes
        advice = (f"set optim.batch_size to at most {fits}" if fits else
                  f"train on at least {processes} samples, one per process")
        raise UserError(f"optim.batch_size = {batch_size} exceeds the {samples} training "
                        f"samples of {data.beton_dir}{limit}: {advice}")
    classes = len(manifest["class_names"])
    if is_photo(manifest) and augment.kind == "pad_crop":
        raise UserError(f"{data.beton_dir} holds photos of many sizes: augment.kind = "
                        "\"pad_crop\" is for fixed-size images; set augment.kind = "
                        "\"resized_crop\" (and data.canvas_size)")
    if is_photo(manifest) and not data.canvas_size:
        resolution = manifest["image_policy"].get("max_resolution", "its max resolution")
        raise UserError(f"{data.beton_dir} holds photos: set data.canvas_size to at least "
                        f"{resolution}")
    if k > classes:
        raise UserError(f"generations.k = {k} exceeds the {classes} classes of "
                        f"{data.beton_dir}: set generations.k to at most {classes}")
