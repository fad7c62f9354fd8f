"""data.decode = "gpu": JPEG bytes through the loader, decoded a batch at a time on the device.

On the CPU the same code decodes with torchvision's libjpeg-turbo; on a GPU with nvJPEG.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import (
    DEVICES,
    RECIPE,
    RUN_DEVICE,
    one_line_refusal,
    tiny_run_flags,
    write_image_folder,
)
from PIL import Image

from beton_builders.__main__ import main as build_betons
from fasttt import jpeg
from fasttt.betons import image_storage, read_manifest
from fasttt.cache import (
    CACHE_MANIFEST,
    CHECKSUMS,
    array_specs,
    cache_spec,
    open_arrays,
    seal_manifest,
)
from fasttt.canvas import JPG, fit_extent
from fasttt.data import sequential_loader, split_loader, train_loader
from fasttt.files import write_json
from fasttt.jpeg import FFCV_DECODER, decoder_name, device_jpeg_decoder
from fasttt.recipe import AugmentConfig, CacheConfig, DataConfig, build_recipe
from fasttt.teachers import ViewSchedule
from fasttt.train import main as train

# Within each photo's extent and border, FFCV's decode (libjpeg-turbo's fast integer DCT)
# against torchvision's. On the CPU, libjpeg-turbo's accurate DCT: the two IDCTs round
# apart by a few levels at quality 90 (measured on these photos: max 3, mean 1.0). On a
# GPU, nvJPEG (not yet measured here): torchvision's own bound between it and libjpeg-turbo
# (mean < 2) plus the fast DCT's share; no bound per pixel, as chroma upsampling differs.
MAX_DIFF = {"cpu": 8, "cuda": 255}
MEAN_DIFF = {"cpu": 1.5, "cuda": 3.0}
# A photo larger than the canvas: DCT scaling plus an area resize against an area resize
# alone (measured on the CPU: mean 4.2 on the worst photo), as test_data.py bounds PIL's.
SHRUNK_MEAN_DIFF = 8.0


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The mixed-mode ImageFolder tree built twice: all JPEG, and all raw pixels."""
    root = tmp_path_factory.mktemp("jpeg")
    write_image_folder(root / "tree", corrupt=False)
    for mode in ("jpg", "raw"):
        build_betons(["imagefolder", str(root / "tree"), str(root / mode), "--write-mode",
                      mode, "--num-workers", "1"])
    return root


def batches(loader) -> list:
    """Every batch of one pass, its tensors copied to the host (FFCV reuses its buffers)."""
    return [type(b)(*(t.cpu().clone() for t in b)) for b in loader]


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_on_the_device_gives_ffcvs_canvases_within_a_few_levels(photos, device):
    accelerator = Accelerator(cpu=device == "cpu")
    for canvas_size in (80, 16):  # every photo fits; every photo is shrunk to fit
        data = DataConfig(beton_dir=str(photos / "jpg"), canvas_size=canvas_size,
                          num_workers=1, decode="gpu")
        on_device = batches(split_loader(data, accelerator, "train", 3))
        ffcv = batches(sequential_loader(photos / "jpg", split="train", batch_size=3,
                                         num_workers=1, canvas_size=canvas_size))
        assert len(on_device) == len(ffcv) == 2
        for got, want in zip(on_device, ffcv, strict=True):
            assert got.image.shape == want.image.shape and got.image.dtype == torch.uint8
            assert torch.equal(got.extent, want.extent) and torch.equal(got.label, want.label)
            assert torch.equal(got.index, want.index)
            for canvas, expected, (height, width) in zip(got.image, want.image,
                                                         got.extent.tolist(), strict=True):
                inside = (slice(None), slice(0, height + 1), slice(0, width + 1))  # + border
                diff = (canvas[inside].int() - expected[inside].int()).abs().float()
                if (height, width) in ((40, 60), (64, 32), (50, 50), (30, 70)):
                    assert diff.max() <= MAX_DIFF[device] and diff.mean() < MEAN_DIFF[device]
                else:
                    assert diff.mean() < SHRUNK_MEAN_DIFF
                outside = canvas.clone()
                outside[inside] = 0
                assert not outside.any()  # zeros beyond the border


@pytest.mark.parametrize("device", DEVICES)
def test_a_sample_decodes_to_the_same_pixels_every_epoch_and_every_call(photos, device):
    loader = sequential_loader(photos / "jpg", split="train", batch_size=4, num_workers=1,
                               canvas_size=80, device=torch.device(device), decode="gpu")
    first, second = batches(loader), batches(loader)
    assert all(torch.equal(a.image, b.image) for a, b in zip(first, second, strict=True))
    rows, sizes, extent = jpeg_rows([encoded(40, 60, seed) for seed in range(3)])
    index = torch.arange(3)
    again = [loader.jpeg(rows, sizes, index, extent.to(device)).cpu() for _ in range(2)]
    assert torch.equal(*again)
    assert again[0].is_contiguous(memory_format=torch.channels_last)


def encoded(height: int, width: int, seed: int) -> bytes:
    """A quality-90 JPEG of a random photo."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def jpeg_rows(blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The host rows and sizes FFCV's ops give for these JPEGs, and their extents on 80."""
    rows = torch.zeros((len(blobs), max(map(len, blobs))), dtype=torch.uint8)
    sizes, extent = [], []
    for row, blob in zip(rows, blobs, strict=True):
        row[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        height, width = Image.open(io.BytesIO(blob)).size[::-1]
        sizes.append((len(blob), height, width))
        extent.append(fit_extent(height, width, 80))
    return rows, torch.tensor(sizes), torch.tensor(extent, dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
def test_one_bad_jpeg_fails_its_batch_in_one_line_naming_the_sample(photos, device):
    path = photos / "jpg" / read_manifest(photos / "jpg")["splits"]["train"]["file"]
    decoder = device_jpeg_decoder("gpu", 100, 80, torch.device(device), path,
                                  read_manifest(photos / "jpg"), 4)
    rows, sizes, extent = jpeg_rows([encoded(40, 60, seed) for seed in range(3)])
    extent = extent.to(device)
    index = torch.tensor([7, 8, 9])
    cut = sizes.clone()
    cut[1, 0] = 40  # sample 8's bytes end inside its header
    message = one_line_refusal(lambda: decoder(rows, cut, index, extent),
                               f"sample 8 of {path} is not a JPEG that decodes",
                               "whole batch fails", "rebuild it with `python -m beton_builders")
    assert "sample 7" not in message
    taller = sizes.clone()
    taller[2, 1] = 41  # the metadata promises another size than the bytes hold
    one_line_refusal(lambda: decoder(rows, taller, index, extent),
                     "sample 9", "decodes to 40x60 pixels, not the 41x60 stored")


def test_a_batch_only_the_device_decoder_fails_is_one_line_advising_the_cpu(photos,
                                                                           monkeypatch):
    path = photos / "jpg" / read_manifest(photos / "jpg")["splits"]["train"]["file"]
    decoder = device_jpeg_decoder("gpu", 100, 80, torch.device("cpu"), path,
                                  read_manifest(photos / "jpg"), 4)
    decode = jpeg._torchvision_decode

    def fails_in_batches(blobs, device):
        if len(blobs) > 1:  # as nvJPEG's batched path might, on JPEGs that decode alone
            raise RuntimeError("decode_jpegs_cuda, decode_jpegs_cuda.cpp:1, "
                               "NVJPEG_STATUS_EXECUTION_FAILED")
        return decode(blobs, device)

    monkeypatch.setattr(jpeg, "_torchvision_decode", fails_in_batches)
    rows, sizes, extent = jpeg_rows([encoded(40, 60, seed) for seed in range(3)])
    one_line_refusal(lambda: decoder(rows, sizes, torch.tensor([7, 8, 9]), extent),
                     "torchvision-cpu could not decode the batch of samples 7 to 9 of",
                     "(NVJPEG_STATUS_EXECUTION_FAILED): set data.decode = \"cpu\"")


def within_border(canvas: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """The pixels of a canvas a crop may read: the photo's extent and its one-pixel border."""
    height, width = extent.tolist()
    return canvas[:, :height + 1, :width + 1]


def test_raw_samples_keep_ffcvs_path_under_gpu_decoding(photos, tmp_path):
    # A beton of raw pixels decodes on FFCV's threads alone; one stored as FFCV's ImageNet
    # betons are (--write-mode proportion) sends the device its JPEGs and FFCV's canvases
    # of the rest, which keep their pixels bit for bit.
    np.random.seed(1)  # FFCV draws each sample's mode from numpy's global state: a mix
    build_betons(["imagefolder", str(photos / "tree"), str(tmp_path / "mixed"), "--write-mode",
                  "proportion", "--compress-probability", "0.5", "--num-workers", "1"])
    settings = dict(split="train", batch_size=4, num_workers=1, canvas_size=80)
    for betons in (photos / "raw", tmp_path / "mixed"):
        on_device = sequential_loader(betons, decode="gpu", **settings)
        ffcv = sequential_loader(betons, **settings)
        manifest = read_manifest(betons)
        modes, _ = image_storage(betons / manifest["splits"]["train"]["file"], manifest, 4)
        assert (on_device.jpeg is None) == (betons.name == "raw")
        assert len(set(modes.tolist())) == (1 if betons.name == "raw" else 2)  # JPEG and raw
        (got,), (want,) = batches(on_device), batches(ffcv)
        for canvas, expected, extent, mode in zip(got.image, want.image, got.extent, modes,
                                                  strict=True):
            diff = (within_border(canvas, extent).int()
                    - within_border(expected, extent).int()).abs()
            if mode == JPG:
                assert diff.float().mean() < MEAN_DIFF["cpu"]
            else:
                assert not diff.any()
    one_line_refusal(lambda: build_recipe({"data": {"decode": "tpu"}}, "r.toml"),
                     "data.decode must be \"cpu\" or \"gpu\" or \"auto\"")
    one_line_refusal(lambda: build_recipe({"data": {"gpu_decode_percent": 0}}, "r.toml"),
                     "data.gpu_decode_percent must be in 1..100")


@pytest.mark.parametrize("device", DEVICES)
def test_a_split_by_index_decodes_each_sample_with_one_decoder_every_epoch(photos, device):
    # data.gpu_decode_percent = 2: samples 0 and 1 of each hundred to the device, 2 and 3
    # to FFCV, in every batch and order: each sample's pixels are its decoder's alone.
    settings = dict(split="train", batch_size=4, num_workers=1, canvas_size=80,
                    device=torch.device(device))
    split = sequential_loader(photos / "jpg", decode="gpu", gpu_percent=2, **settings)
    alone = {"device": batches(sequential_loader(photos / "jpg", decode="gpu", **settings)),
             "ffcv": batches(sequential_loader(photos / "jpg", **settings))}
    assert not split.jpeg.every and alone["device"][0].image.shape == (4, 3, 80, 80)
    # FFCV sends only its own photos: samples 2 and 3 fill one packed row, all four two
    ((packed, *_),), ((every, *_),) = (list(loader.loader) for loader in (
        split, sequential_loader(photos / "jpg", **settings)))
    assert len(packed) == 1 and len(every) == 2
    for got in (batches(split), batches(split)):
        (batch,) = got
        for row, sample in enumerate(batch.index.tolist()):
            decoder = "device" if sample % 100 < 2 else "ffcv"
            want = alone[decoder][0]
            assert want.index[row] == sample
            assert torch.equal(within_border(batch.image[row], batch.extent[row]),
                               within_border(want.image[row], want.extent[row])), (sample,
                                                                                  decoder)
    ordered = train_loader(photos / "jpg", batch_size=2, seed=3, num_workers=1,
                           canvas_size=80, device=torch.device(device), decode="gpu",
                           gpu_percent=2)
    for batch in batches(ordered):  # shuffled: each sample still meets its own decoder
        for row, sample in enumerate(batch.index.tolist()):
            decoder = "device" if sample % 100 < 2 else "ffcv"
            want = alone[decoder][0]
            assert torch.equal(within_border(batch.image[row], batch.extent[row]),
                               within_border(want.image[sample], want.extent[sample]))


def test_the_decoder_is_in_the_caches_fingerprint_and_old_caches_stay_valid(tmp_path):
    assert decoder_name("cpu", torch.device("cuda")) == FFCV_DECODER
    assert decoder_name("auto", torch.device("cuda")) == FFCV_DECODER  # until measured
    assert decoder_name("gpu", torch.device("cuda")) == "nvjpeg"
    assert decoder_name("gpu", torch.device("cpu")) == "torchvision-cpu"
    assert decoder_name("gpu", torch.device("cuda"), 50) == "nvjpeg:50%+ffcv"
    (tmp_path / "teacher.safetensors").write_bytes(b"weights")
    views = ViewSchedule(key=1, epochs=2, count=2, augment=AugmentConfig())

    def spec(decoder: str):
        return cache_spec(tmp_path / "teacher.safetensors", {"splits": {"train": {
            "sha256": "0" * 64}}}, 6, views, CacheConfig(), 3, 1.0, decoder=decoder)

    ffcv, nvjpeg = spec(FFCV_DECODER), spec("nvjpeg")
    assert "decoder" not in ffcv.manifest()  # the manifest caches had before data.decode
    assert nvjpeg.manifest()["decoder"] == "nvjpeg"
    for built, other in ((ffcv, nvjpeg), (nvjpeg, ffcv), (nvjpeg, spec("torchvision-cpu")),
                         (nvjpeg, spec("nvjpeg:50%+ffcv"))):
        cache = fake_cache(tmp_path / f"{built.decoder}-cache", built)
        open_arrays(cache, built)
        one_line_refusal(lambda cache=cache, other=other: open_arrays(cache, other),
                         "was built for another JPEG decoder (data.decode, "
                         "data.gpu_decode_percent)")
    assert dataclasses.replace(ffcv, decoder="nvjpeg") == nvjpeg


def fake_cache(cache_dir, spec):
    """A complete, sealed cache of zeros for `spec`, as build_cache would leave it."""
    cache_dir.mkdir(exist_ok=True)
    for name, (shape, dtype) in array_specs(spec.manifest()).items():
        np.save(cache_dir / f"{name}.npy", np.zeros(shape, dtype))
    checksums = {name: ["0" * 64] * spec.stored_views for name in array_specs(spec.manifest())}
    write_json(cache_dir / CACHE_MANIFEST,
               seal_manifest({**spec.manifest(), CHECKSUMS: checksums, "complete": True}))
    return cache_dir


def test_a_run_trains_caches_and_analyses_on_bytes_decoded_on_its_device(photos, tmp_path):
    # The demo recipe on the photo beton: a patriarch, its cache and a student, every
    # stage reading its batches through the one decoding iterator.
    train([str(RECIPE), *tiny_run_flags(
        photos / "jpg", **{"data.builtin": '""', "data.canvas_size": 80,
                           "data.decode": '"gpu"', "data.train_limit": 4,
                           "optim.batch_size": 2, "augment.kind": '"resized_crop"',
                           "generations.k": 2, "generations.students": 1,
                           "schedule.epochs": 1, "cache.views": 1}),
           "--runs-dir", str(tmp_path)])
    run = tmp_path / "digits_d06"
    cache = json.loads((run / "gen0" / "cache" / CACHE_MANIFEST).read_text())
    assert cache["decoder"] == decoder_name("gpu", torch.device(RUN_DEVICE))
    assert json.loads((run / "gen1" / "eval.json").read_text())["last"]["val_top1"] >= 0
    assert (run / "summary.md").is_file()  # the analysis and report read the run's betons


def write_digit_photos(root):
    """scikit-learn's digits as 32x32 quality-90 JPEG photos in an ImageFolder tree: every
    fifth in val, the rest in train."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.kron(image * 255 / 16, np.ones((4, 4))).round().astype(np.uint8)
        path = root / ("val" if i % 5 == 0 else "train") / str(label) / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert("RGB").save(path, format="JPEG", quality=90)


def test_a_run_decoded_on_the_device_learns_as_one_decoded_by_ffcv(tmp_path):
    # The same patriarch on the digits as photos, decoded by FFCV and by the device's
    # decoder (nvJPEG on a GPU, libjpeg-turbo's accurate DCT here): pixels a few levels
    # apart, the same accuracy band.
    write_digit_photos(tmp_path / "tree")
    build_betons(["imagefolder", str(tmp_path / "tree"), str(tmp_path / "photos"),
                  "--write-mode", "jpg", "--num-workers", "1"])
    accuracy = {}
    for decode in ("cpu", "gpu"):
        train([str(RECIPE), *tiny_run_flags(
            tmp_path / "photos", **{"data.builtin": '""', "data.canvas_size": 32,
                                    "data.decode": f'"{decode}"', "data.train_limit": 0,
                                    "augment.kind": '"resized_crop"', "augment.scale": "[0.5, 1.0]",
                                    "schedule.epochs": 6}),
               "--runs-dir", str(tmp_path / decode)])
        summary = json.loads((tmp_path / decode / "digits_d06" / "gen0" / "eval.json").read_text())
        accuracy[decode] = summary["last"]["val_top1"]
    assert min(accuracy.values()) > 80 and abs(accuracy["gpu"] - accuracy["cpu"]) < 5, accuracy
