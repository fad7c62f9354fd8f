"""fasttt.data: the loaders every later stage reads batches from, over real betons."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import DEVICES, one_line_refusal, tiny_recipe, write_image_folder
from ffcv.transforms import ToDevice
from PIL import Image

from beton_builders.__main__ import main
from beton_builders.digits import build_digits_dir
from fasttt.betons import read_manifest
from fasttt.canvas import dct_denominator, fit_extent, gather_unit, packed_row_bytes
from fasttt.data import (
    ensure_betons,
    generation_loaders,
    sequential_loader,
    sequential_loaders_reused,
    shard_indices,
    split_loader,
    train_loader,
    train_samples,
)
from fasttt.errors import UserError


def epoch_indices(loader) -> np.ndarray:
    """Sample indices of one epoch, in the order the loader gave them."""
    return np.concatenate([batch.index.numpy().copy() for batch in loader])


def test_train_loader_shuffles_drops_last_and_is_seeded(digits):
    loader = train_loader(digits, batch_size=100, seed=3, num_workers=1)
    first, second = epoch_indices(loader), epoch_indices(loader)
    assert len(loader) == 1437 // 100 and len(first) == 1400
    assert len(set(first.tolist())) == 1400 and not np.array_equal(first, np.sort(first))
    assert not np.array_equal(first, second)  # a new order every epoch
    again = train_loader(digits, batch_size=100, seed=3, num_workers=1)
    assert np.array_equal(epoch_indices(again), first)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sequential_shards_cover_every_sample_once(digits, world_size):
    seen = [epoch_indices(sequential_loader(digits, split="val", batch_size=64,
                                            num_workers=1, rank=r, world_size=world_size))
            for r in range(world_size)]
    assert np.array_equal(np.concatenate(seen), np.arange(360))


def test_within_a_run_an_in_order_pass_asked_for_again_is_the_loader_built_before(digits,
                                                                                    tmp_path):
    rows = np.arange(0, 300, 3)
    with sequential_loaders_reused():
        first = sequential_loader(digits, split="train", batch_size=64, num_workers=1, rows=rows)
        before = epoch_indices(first)
        assert sequential_loader(digits, split="train", batch_size=64, num_workers=1,
                                 rows=rows.copy()) is first
        assert np.array_equal(epoch_indices(first), before)  # the same rows, in order, again
        assert sequential_loader(digits, split="train", batch_size=32, num_workers=1,
                                 rows=rows) is not first
        assert sequential_loader(digits, split="train", batch_size=64, num_workers=1,
                                 rows=rows[1:]) is not first
        copy = shutil.copytree(digits, tmp_path / "digits")
        in_copy = sequential_loader(copy, split="val", batch_size=64, num_workers=1)
        shutil.copy(digits / "val.beton", copy / "val.beton.new")
        (copy / "val.beton.new").replace(copy / "val.beton")  # rebuilt in place
        assert sequential_loader(copy, split="val", batch_size=64, num_workers=1) is not in_copy
    assert sequential_loader(digits, split="train", batch_size=64, num_workers=1,
                             rows=rows) is not first  # outside a run: a loader of its own


def test_shard_indices_are_disjoint_and_balanced():
    shards = [shard_indices(10, r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 2, 2]
    assert np.array_equal(np.concatenate(shards), np.arange(10))


def test_batches_are_channels_last_uint8_and_move_to_a_device(digits):
    loader = sequential_loader(digits, split="val", batch_size=32, num_workers=1,
                               device=torch.device("cpu"))
    batch = next(iter(loader))
    assert batch.image.shape == (32, 3, 32, 32) and batch.image.dtype == torch.uint8
    assert batch.image.is_contiguous(memory_format=torch.channels_last)
    assert batch.label.shape == (32,) and batch.label.dtype == torch.int64
    assert batch.index.tolist() == list(range(32))
    assert batch.extent is None  # fixed-size images fill the canvas
    assert batch._fields == ("image", "label", "index", "extent")


@pytest.fixture(scope="module")
def photo_betons(tmp_path_factory):
    """The mixed-mode ImageFolder tree built twice: raw pixels and JPEG."""
    root = tmp_path_factory.mktemp("photos")
    write_image_folder(root / "tree", corrupt=False)
    for mode in ("raw", "jpg"):
        main(["imagefolder", str(root / "tree"), str(root / mode), "--write-mode", mode,
              "--num-workers", "1"])
    return root


def source_pixels(tree, relative: str) -> np.ndarray:
    """A source photo decoded by PIL as RGB."""
    with Image.open(tree / relative) as img:
        return np.asarray(img.convert("RGB"))


def test_photos_sit_unresampled_on_the_canvas(photo_betons):
    with pytest.raises(UserError, match="canvas size"):
        sequential_loader(photo_betons / "raw", split="train", batch_size=4)
    batch = next(iter(sequential_loader(photo_betons / "raw", split="train", batch_size=4,
                                        num_workers=2, canvas_size=80)))
    assert batch.image.shape == (4, 3, 80, 80)
    # Photos that fit the canvas keep their original size: the extent is (height, width).
    assert batch.extent.tolist() == [[40, 60], [64, 32], [50, 50], [30, 70]]
    canvas = batch.image[0].permute(1, 2, 0).numpy()
    original = source_pixels(photo_betons / "tree", "train/cat/a.JPEG")
    assert np.array_equal(canvas[:40, :60], original)
    assert np.array_equal(canvas[:40, 60], original[:, 59])  # replicated right edge
    assert np.array_equal(canvas[40, :60], original[39])  # replicated bottom edge


@pytest.mark.parametrize("side", [70, 72])
def test_photos_travel_packed_and_land_on_their_canvases_bit_for_bit(photo_betons, side):
    # FFCV copies each photo with its border, one after another (two canvases' bytes for
    # these four), and each lands at its canvas's top-left. On 70-pixel canvases the last
    # photo fills the width, so it has no right border, and rows are gathered byte by
    # byte; on 72 they are padded to 8 bytes and gathered 8 at a time.
    assert gather_unit(side) == (1 if side == 70 else 8)
    loader = sequential_loader(photo_betons / "raw", split="train", batch_size=4,
                               num_workers=2, canvas_size=side)
    (packed, *_), = list(loader.loader)
    assert packed.shape == (2, packed_row_bytes(side))
    (batch,) = list(loader)
    assert batch.image.shape == (4, 3, side, side)
    assert batch.image.is_contiguous(memory_format=torch.channels_last)
    photos = ["train/cat/a.JPEG", "train/cat/b.JPEG", "train/dog/c.JPEG", "train/dog/d.JPEG"]
    for canvas, (height, width), photo in zip(batch.image, batch.extent.tolist(), photos,
                                              strict=True):
        canvas, original = canvas.permute(1, 2, 0).numpy(), source_pixels(
            photo_betons / "tree", photo)
        bordered = np.pad(original, ((0, 1), (0, 1), (0, 0)), mode="edge")[:side, :side]
        assert np.array_equal(canvas[:height + 1, :width + 1], bordered), photo


def test_jpeg_photos_decode_close_to_pil(photo_betons):
    batch = next(iter(sequential_loader(photo_betons / "jpg", split="val", batch_size=4,
                                        num_workers=1, canvas_size=64)))
    canvas = batch.image[1].permute(1, 2, 0).numpy().astype(int)
    original = source_pixels(photo_betons / "tree", "val/dog/f.JPEG").astype(int)
    assert batch.extent[1].tolist() == [36, 48]
    assert np.abs(canvas[:36, :48] - original).mean() < 4  # JPEG re-encoding error only


def test_photos_larger_than_the_canvas_shrink_to_fit(photo_betons):
    batch = next(iter(sequential_loader(photo_betons / "jpg", split="train", batch_size=4,
                                        num_workers=2, canvas_size=16)))
    # Shrunk to fit, each at its original aspect ratio (40x60, 64x32, 50x50, 30x70).
    assert batch.extent.tolist() == [[10, 16], [16, 8], [16, 16], [6, 16]]
    assert batch.extent.tolist() == [list(fit_extent(h, w, 16)) for h, w in
                                     [(40, 60), (64, 32), (50, 50), (30, 70)]]
    tall = batch.image[1].permute(1, 2, 0).numpy()[:16, :8].astype(int)  # 1/4 DCT decode
    original = source_pixels(photo_betons / "tree", "train/cat/b.JPEG")
    expected = np.asarray(Image.fromarray(original).resize((8, 16), Image.BOX)).astype(int)
    assert np.abs(tall - expected).mean() < 8


def test_canvas_geometry():
    assert fit_extent(40, 60, 80) == (40, 60) and fit_extent(30, 70, 16) == (6, 16)
    assert dct_denominator(64, 32, 16, 8) == 4 and dct_denominator(50, 50, 16, 16) == 2
    assert dct_denominator(40, 60, 40, 60) == 1


def test_missing_beton_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="beton_builders"):
        train_loader(tmp_path / "nothing", batch_size=8, seed=0)


def test_bad_split_and_oversized_batch_are_user_errors(digits):
    with pytest.raises(UserError, match="no 'test' split"):
        sequential_loader(digits, split="test", batch_size=8)
    with pytest.raises(UserError, match="lower the batch size"):
        train_loader(digits, split="val", batch_size=512, seed=0)


def test_generation_loaders_follow_the_recipe_and_the_generations_key(digits):
    recipe = tiny_recipe(digits, **{"data.train_limit": 200})
    accelerator = Accelerator(cpu=True)
    assert train_samples(recipe.data, read_manifest(digits)) == 200
    assert train_samples(tiny_recipe(digits, **{"data.train_limit": 0}).data,
                         read_manifest(digits)) == 1437
    train, val = generation_loaders(recipe.data, 64, 7, accelerator)
    assert (len(train), len(val)) == (200 // 64, 3)  # val: batches of 2 x 64, all 360
    first = epoch_indices(train)
    assert len(first) == 192 and set(first.tolist()) <= set(range(200))
    again, _ = generation_loaders(recipe.data, 64, 7, accelerator)
    other, _ = generation_loaders(recipe.data, 64, 8, accelerator)
    assert np.array_equal(epoch_indices(again), first)
    assert not np.array_equal(epoch_indices(other), first)  # another key, another order
    train.set_epoch(0)
    assert np.array_equal(epoch_indices(train), first)  # epoch 0 replayed exactly
    assert np.array_equal(epoch_indices(val), np.arange(360))
    limited = split_loader(recipe.data, accelerator, "train", 50, limit=120)
    assert np.array_equal(epoch_indices(limited), np.arange(120))


def val_batches(digits, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every val batch's images and labels, copied to the host."""
    loader = sequential_loader(digits, split="val", batch_size=64, num_workers=1,
                               device=torch.device(device))
    return [(batch.image.cpu().clone(), batch.label.cpu().clone()) for batch in loader]


@pytest.mark.parametrize("device", DEVICES)
def test_a_loader_read_under_inference_mode_gives_the_batches_read_outside(digits, device):
    # FFCV's reader thread, where inference mode is off (it is thread-local), copies each
    # batch into buffers allocated when the epoch starts: inference tensors, if the epoch
    # started inside inference mode, which then refuse the copy (the first H200 run).
    outside = val_batches(digits, device)
    with torch.inference_mode():
        inside = val_batches(digits, device)
    assert len(inside) == len(outside) == 6
    for (image, label), (image_out, label_out) in zip(inside, outside, strict=True):
        assert torch.equal(image, image_out) and torch.equal(label, label_out)


def test_a_batchs_index_outlives_the_readers_buffers(digits):
    # FFCV's reader refills a batch's buffers once the batch after it is taken, while the
    # device copy a step made of its index may not have run yet (a GPU behind the host).
    loader = sequential_loader(digits, split="val", batch_size=8, num_workers=1)
    held = [(batch.index, batch.index.clone()) for batch in loader]
    assert len(held) > 8  # more than the reader's buffers
    assert all(torch.equal(index, as_given) for index, as_given in held)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU; benchmarks/gpu_check.py runs it")
def test_a_gpu_far_behind_the_host_still_reads_each_batchs_own_samples(digits):
    # A step that never waits for the device (a CUDA graph's) lets the host run ahead:
    # FFCV's copies of a batch, waiting on the reader's streams for older steps, must still
    # read that batch's bytes, not those of a batch decoded later into the same buffers.
    device = torch.device("cuda")

    def checksums(behind: bool) -> list:
        loader = sequential_loader(digits, split="val", batch_size=8, num_workers=1,
                                   device=device)
        sums = []
        for batch in loader:
            if behind:
                torch.cuda._sleep(20_000_000)  # ~10 ms of device time per batch
            index = batch.index.to(device, non_blocking=True)
            sums.append(torch.stack([batch.image.sum(dtype=torch.int64),
                                     batch.label.sum(), index.sum()]))
            if not behind:
                torch.cuda.synchronize()
        return torch.stack(sums).tolist()

    assert checksums(behind=True) == checksums(behind=False)


def test_the_cpu_loaders_take_the_gpu_loaders_pipeline_steps(digits):
    def steps(device: str) -> dict[str, list[str]]:
        pipelines = sequential_loader(digits, split="val", batch_size=8, num_workers=1,
                                      device=torch.device(device)).loader.pipeline_specs
        return {field: [type(op).__name__ for op in spec.transforms]
                for field, spec in pipelines.items()}

    cpu = steps("cpu")
    assert cpu == steps("cuda")  # FFCV builds its pipelines without touching the device
    assert "ToDevice" in cpu["image"] and "ToDevice" in cpu["label"]
    assert "ToDevice" not in cpu["index"]  # cache lookups read host rows with it


def failing_device_copy(monkeypatch, error: BaseException) -> None:
    """Make FFCV's device copy, which runs in the reader thread, raise `error`."""
    def generate_code(op):
        def to_device(inp, dst):
            raise error
        return to_device

    monkeypatch.setattr(ToDevice, "generate_code", generate_code)


def test_a_reader_error_on_a_sound_beton_is_named_and_no_rebuild_is_advised(digits,
                                                                             monkeypatch):
    failing_device_copy(monkeypatch, RuntimeError("Inplace update to inference tensor\nmore"))
    loader = sequential_loader(digits, split="val", batch_size=64, num_workers=1)
    message = one_line_refusal(lambda: list(loader), "RuntimeError: Inplace update to "
                               "inference tensor)", "passes its checks", "fasttt bug")
    assert "rebuild it" not in message


def test_a_reader_error_on_a_beton_damaged_since_it_was_opened_advises_the_rebuild(
        digits, tmp_path, monkeypatch):
    work = tmp_path / "digits"
    shutil.copytree(digits, work)
    failing_device_copy(monkeypatch, IndexError("index 4096 is out of bounds"))
    loader = sequential_loader(work, split="val", batch_size=64, num_workers=1)
    with open(work / read_manifest(work)["splits"]["val"]["file"], "r+b") as beton:
        beton.write(b"\xff" * 8)  # the header's format version
    one_line_refusal(lambda: list(loader), "is damaged (FFCV format",
                     "rebuild it with `python -m beton_builders digits")


def test_ensure_betons_builds_missing_digits_once_with_the_builder_it_is_given(digits, tmp_path):
    data, built = tiny_recipe(tmp_path / "digits").data, []  # the demo recipe: builtin digits

    def build(out_dir):
        built.append(out_dir)
        build_digits_dir(out_dir)

    accelerator = Accelerator(cpu=True)
    manifest = ensure_betons(data, accelerator, build)
    assert built == [tmp_path / "digits"] and manifest == read_manifest(digits)
    assert ensure_betons(data, accelerator, build) == manifest and len(built) == 1
