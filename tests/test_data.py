"""fasttt.data: the loaders every later stage reads batches from, over real betons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from beton_builders.__main__ import main
from fasttt.data import sequential_loader, shard_indices, train_loader
from fasttt.errors import UserError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """The embedded default, built once for this module."""
    out = tmp_path_factory.mktemp("betons") / "digits"
    main(["digits", str(out)])
    return out


def epoch_indices(loader) -> np.ndarray:
    """Sample indices of one epoch, in the order the loader gave them."""
    return np.concatenate([batch.index.numpy().copy() for batch in loader])


def test_train_loader_shuffles_drops_last_and_is_seeded(digits_dir):
    loader = train_loader(digits_dir, batch_size=100, seed=3, num_workers=1)
    first, second = epoch_indices(loader), epoch_indices(loader)
    assert len(loader) == 1437 // 100 and len(first) == 1400
    assert len(set(first.tolist())) == 1400 and not np.array_equal(first, np.sort(first))
    assert not np.array_equal(first, second)  # a new order every epoch
    again = train_loader(digits_dir, batch_size=100, seed=3, num_workers=1)
    assert np.array_equal(epoch_indices(again), first)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sequential_shards_cover_every_sample_once(digits_dir, world_size):
    seen = [epoch_indices(sequential_loader(digits_dir, split="val", batch_size=64,
                                            num_workers=1, rank=r, world_size=world_size))
            for r in range(world_size)]
    assert np.array_equal(np.concatenate(seen), np.arange(360))


def test_shard_indices_are_disjoint_and_balanced():
    shards = [shard_indices(10, r, 4) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 2, 2]
    assert np.array_equal(np.concatenate(shards), np.arange(10))


def test_batches_are_channels_last_uint8_and_move_to_a_device(digits_dir):
    loader = sequential_loader(digits_dir, split="val", batch_size=32, num_workers=1,
                               device=torch.device("cpu"))
    batch = next(iter(loader))
    assert batch.image.shape == (32, 3, 32, 32) and batch.image.dtype == torch.uint8
    assert batch.image.is_contiguous(memory_format=torch.channels_last)
    assert batch.label.shape == (32,) and batch.label.dtype == torch.int64
    assert batch.size is None


def test_photos_decode_whole_image_to_the_canvas(tmp_path):
    write_image_folder(tmp_path / "tree", corrupt=False)
    main(["imagefolder", str(tmp_path / "tree"), str(tmp_path / "p"), "--write-mode", "raw",
          "--num-workers", "1"])
    with pytest.raises(UserError, match="canvas size"):
        sequential_loader(tmp_path / "p", split="val", batch_size=4)
    batch = next(iter(sequential_loader(tmp_path / "p", split="val", batch_size=4,
                                        num_workers=1, canvas_size=16)))
    assert batch.image.shape == (2, 3, 16, 16)
    assert batch.size.tolist() == [[45, 45], [36, 48]]
    # The whole frame is kept: the canvas's left column matches the photo's dark left edge.
    assert batch.image[:, 0, :, 0].float().mean() < batch.image[:, 0, :, -1].float().mean()


def test_missing_beton_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="beton_builders"):
        train_loader(tmp_path / "nothing", batch_size=8, seed=0)
