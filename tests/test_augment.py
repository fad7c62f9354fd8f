"""Keyed augmentation: pure functions of (seed, index, view), equal to torchvision's ops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import DEVICES

from fasttt.augment import (
    center_crop_boxes,
    eval_images,
    eval_view,
    flip_mask,
    generation_key,
    keyed_uniform,
    normalize,
    pad_crop_flip,
    resample_boxes,
    resized_crop_boxes,
    train_size,
    train_view,
)
from fasttt.data import Batch
from fasttt.recipe import AugmentConfig
from fasttt.teachers import KeyedView

# Resampled pixels are matrix products: on CUDA they may run in TF32, which the trainer
# enables there (fasttt/processes.py), up to half a grey level from float32's.
GREY_ATOL = {"cpu": 0.0, "cuda": 0.5}
CIFAR = AugmentConfig()
PHOTO = AugmentConfig(kind="resized_crop", min_size=24, max_size=24, eval_size=24,
                      eval_crop_ratio=0.875)


def smooth_images(batch: int, height: int, width: int, seed: int = 0, noise: float = 40,
                  cell: int = 4) -> torch.Tensor:
    """uint8 NCHW images: random values on a grid of `cell` pixels, upsampled, plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // cell + 1, width // cell + 1, generator=g) * 255
    big = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    noise = torch.rand(batch, 3, height, width, generator=g) * noise
    return (big * 0.85 + noise).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
def test_keyed_uniform_is_a_fixed_function_of_the_key(device):
    index = torch.tensor([0, 1, 2, 1_000_000], device=device)
    values = keyed_uniform(7, index, 3, 5)
    assert values.dtype == torch.float32 and ((0 <= values) & (values < 1)).all()
    assert torch.equal(values, keyed_uniform(7, index.int(), 3, 5))
    assert torch.equal(values[1:2], keyed_uniform(7, index[1:2], 3, 5))
    for changed in (keyed_uniform(8, index, 3, 5), keyed_uniform(7, index, 4, 5),
                    keyed_uniform(7, index, 3, 6)):
        assert not torch.equal(changed, values)
    # Pinned: a silent change of the hash would change every cached teacher view.
    assert values.tolist() == pytest.approx(GOLDEN, abs=0)


GOLDEN = [0.5422650575637817, 0.36569565534591675, 0.5245974063873291, 0.5816314220428467]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [CIFAR, PHOTO], ids=["pad_crop", "resized_crop"])
def test_same_key_same_pixels_whatever_the_batch(spec, device):
    images, index = smooth_images(8, 32, 32).to(device), torch.arange(100, 108, device=device)
    size = 32 if spec is CIFAR else 24
    full = train_view(images, index, seed=1, view=2, size=size, augment=spec)
    order = torch.tensor([5, 2, 7], device=device)
    part = train_view(images[order], index[order], seed=1, view=2, size=size, augment=spec)
    # pad_crop only gathers; normalised, a grey level is 1 / (255 std) units
    atol = 0.0 if spec is CIFAR else GREY_ATOL[device] / (255 * min(spec.std))
    assert torch.allclose(part, full[order], rtol=0, atol=atol)
    other_view = train_view(images, index, seed=1, view=3, size=size, augment=spec)
    assert not torch.equal(other_view, full)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", [CIFAR, PHOTO], ids=["pad_crop", "resized_crop"])
def test_a_view_keyed_by_device_tensors_is_the_one_keyed_by_ints(spec, device):
    # A compiled step takes the key and view as tensors (KeyedView.on), so that one graph
    # serves every epoch and generation: its students must see the eager step's pixels.
    images, index = smooth_images(8, 32, 32).to(device), torch.arange(100, 108, device=device)
    extent = None if spec is CIFAR else torch.tensor([[32, 20], [17, 32]] * 4, device=device)
    size = 32 if spec is CIFAR else 24
    seed = generation_key(5, 3)  # 31 bits, as every generation's
    for view in (0, 1, 163):
        keyed = KeyedView(seed, view, size)
        as_ints = train_view(images, index, seed=seed, view=view, size=size, augment=spec,
                             extent=extent)
        on_device = keyed.on(images.device)
        assert on_device.key.shape == () and on_device.view.dtype == torch.int64
        as_tensors = train_view(images, index, seed=on_device.key, view=on_device.view,
                                size=size, augment=spec, extent=extent)
        assert torch.equal(as_tensors, as_ints), view


def test_flip_rate_and_crop_ranges_over_many_keys():
    index = torch.arange(20_000)
    assert abs(flip_mask(0, index, 0).float().mean().item() - 0.5) < 0.015
    heights, widths = torch.full((20_000,), 375), torch.full((20_000,), 500)
    boxes = resized_crop_boxes(0, index, 0, heights, widths, (0.08, 1.0), (0.75, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert ((top >= 0) & (left >= 0) & (top + h <= 375) & (left + w <= 500)).all()
    area = (h * w).double() / (375 * 500)
    assert area.min() > 0.075 and area.max() <= 1.0 and area.std() > 0.2
    aspect = w.double() / h.double()
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    assert top.float().std() > 20 and left.float().std() > 20  # positions vary too


def test_resized_crop_falls_back_to_a_centred_clamped_box():
    # A frame far too wide for the ratio range: no draw fits, torchvision centres.
    boxes = resized_crop_boxes(0, torch.arange(4), 0, torch.full((4,), 10),
                               torch.full((4,), 400), (0.9, 1.0), (0.75, 4 / 3))
    assert boxes.tolist() == [[0, 193, 10, 13]] * 4


@pytest.mark.parametrize("device", DEVICES)
def test_pad_crop_flip_equals_torchvision_exactly(device):
    images, index = smooth_images(16, 32, 32), torch.arange(16)
    out = pad_crop_flip(images.to(device), 5, index.to(device), 1, pad=4, flip=True).cpu()
    top = (keyed_uniform(5, index, 1, 1) * 9).long()
    left = (keyed_uniform(5, index, 1, 2) * 9).long()
    mirrored = flip_mask(5, index, 1)
    for i in range(16):
        expected = TF.crop(TF.pad(images[i], [4]), int(top[i]), int(left[i]), 32, 32)
        expected = TF.horizontal_flip(expected) if mirrored[i] else expected
        assert torch.equal(out[i], expected)
    assert 0 < mirrored.sum() < 16


@pytest.mark.parametrize("box,size", [((3, 5, 40, 50), 20), ((10, 4, 12, 9), 24),
                                      ((1, 2, 61, 37), 17), ((0, 0, 64, 64), 64)],
                         ids=["shrink", "enlarge", "odd", "identity"])
@pytest.mark.parametrize("device", DEVICES)
def test_box_resampling_equals_torchvision_resized_crop(box, size, device):
    images = smooth_images(2, 64, 64)
    ours = resample_boxes(images.to(device), torch.tensor([box, box], device=device), size).cpu()
    for i in range(2):
        expected = TF.resized_crop(images[i].float(), *box, [size, size], antialias=True)
        assert torch.allclose(ours[i], expected, atol=1e-3 + GREY_ATOL[device])
    mirrored = resample_boxes(images.to(device), torch.tensor([box, box], device=device), size,
                              torch.tensor([True, False], device=device)).cpu()
    assert torch.allclose(mirrored[0], ours[0].flip(-1), atol=1e-4 + GREY_ATOL[device])
    assert torch.equal(mirrored[1], ours[1])


def test_center_crop_matches_torchvision():
    images = smooth_images(1, 48, 64)
    boxes = center_crop_boxes(torch.tensor([48]), torch.tensor([64]), 0.75)
    assert boxes.tolist() == [[6, 14, 36, 36]]
    ours = eval_view(images, size=36, augment=dataclasses.replace(PHOTO, eval_crop_ratio=0.75),
                     extent=torch.tensor([[48, 64]]))
    expected = TF.normalize(TF.center_crop(images[0].float() / 255, [36, 36]),
                            list(PHOTO.mean), list(PHOTO.std))
    assert torch.allclose(ours[0], expected, atol=1e-5)


def test_normalize_matches_torchvision_and_is_channels_last():
    images = smooth_images(2, 8, 8)
    out = normalize(images, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    expected = TF.normalize(images.float() / 255, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    assert torch.allclose(out.float(), expected, atol=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_photo_crops_stay_inside_the_extent(device):
    canvas = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    canvas[0, :, :30, :20] = 200  # photo 0: 30x20 at the top-left; the rest is undefined
    canvas[1, :, :12, :40] = 100
    canvas[0, :, 30:, :] = canvas[0, :, :, 20:] = 7
    canvas[1, :, 12:, :] = 7
    extent = torch.tensor([[30, 20], [12, 40]])
    spec = dataclasses.replace(PHOTO, mean=(0, 0, 0), std=(1 / 255,) * 3)
    for view in range(20):
        out = train_view(canvas.to(device), torch.tensor([0, 1]), seed=0, view=view, size=16,
                         augment=spec, extent=extent)
        # Bilinear border samples may reach one pixel past the extent, which data.py fills
        # with the edge; here it holds 7, so a wrong box shows as values far from 200/100.
        assert (out[0] - 200).abs().mean() < 10 and (out[1] - 100).abs().mean() < 10


def test_progressive_sizes():
    spec = AugmentConfig(min_size=160, max_size=192, start_ramp=10, end_ramp=13)
    assert [train_size(e, spec) for e in (0, 10, 11, 12, 13, 20)] == [160, 160, 160, 192, 192,
                                                                       192]
    assert train_size(5, AugmentConfig()) == 32


@pytest.mark.parametrize("device", DEVICES)
def test_eval_images_is_the_eval_view_of_a_loader_batch(device):
    images = smooth_images(3, 40, 40)
    extent = torch.tensor([[40, 40], [30, 20], [12, 40]])
    batch = Batch(images, torch.zeros(3, dtype=torch.long), torch.arange(3), extent)
    ours = eval_images(batch, PHOTO, torch.device(device))
    assert ours.device.type == device
    assert torch.equal(ours, eval_view(images.to(device), size=PHOTO.eval_size, augment=PHOTO,
                                       extent=extent))
    assert ours.shape == (3, 3, 24, 24)
    fixed = eval_images(Batch(images, batch.label, batch.index), CIFAR, torch.device(device))
    assert torch.equal(fixed, eval_view(images.to(device), size=CIFAR.eval_size, augment=CIFAR,
                                        extent=None))


@pytest.mark.skipif(len(DEVICES) == 1, reason="needs a GPU; benchmarks/gpu_check.py runs it")
@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("spec", [CIFAR, PHOTO], ids=["pad_crop", "resized_crop"])
def test_a_view_drawn_on_the_gpu_is_the_one_drawn_on_the_cpu(spec, device):
    # A cache built on one device teaches a student on another: same boxes and mirrors.
    images, index = smooth_images(32, 40, 40), torch.arange(500, 532)
    extent = None if spec is CIFAR else torch.randint(
        12, 41, (32, 2), generator=torch.Generator().manual_seed(0))
    size = 40 if spec is CIFAR else 24
    host = train_view(images, index, seed=9, view=4, size=size, augment=spec, extent=extent)
    there = train_view(images.to(device), index.to(device), seed=9, view=4, size=size,
                       augment=spec, extent=extent).cpu()
    atol = 0.0 if spec is CIFAR else GREY_ATOL[device] / (255 * min(spec.std))
    assert torch.allclose(there, host, rtol=0, atol=atol)
    heights, widths = extent.unbind(1) if extent is not None else (None, None)
    if heights is not None:
        boxes = resized_crop_boxes(9, index, 4, heights, widths, spec.scale, spec.ratio)
        assert torch.equal(resized_crop_boxes(9, index.to(device), 4, heights.to(device),
                                              widths.to(device), spec.scale, spec.ratio).cpu(),
                           boxes)
    assert torch.equal(flip_mask(9, index.to(device), 4).cpu(), flip_mask(9, index, 4))
