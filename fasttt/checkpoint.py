"""Atomic checkpoints of one generation: weights as safetensors, the rest as plain tensors.

Layout inside `gen<m>/`: `ckpt-<epoch>/` directories, each complete before it gets its
name, and `latest.json` pointing at the newest, replaced atomically. Nothing is ever
loaded with a pickle that can run code: weights are safetensors, optimizer and RNG state
load with `weights_only=True`, the train state is JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fasttt.errors import UserError, one_line
from fasttt.files import (
    remove_dir,
    sha256_file,
    staged_dir,
    tree_bytes,
    write_atomically,
    write_json,
)

LATEST = "latest.json"
MODEL, STATE, TRAIN_STATE = "model.safetensors", "state.pt", "train_state.json"
SHA256 = "sha256"  # train_state.json's record of what the checkpoint's files hold


def save_weights(model: torch.nn.Module, path: Path) -> str:
    """The model's state (parameters and buffers) as safetensors, written atomically; sha256."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save(state)
    write_atomically(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights saved by `save_weights` (strict: every key must match)."""
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors reports damage with several exception types
        raise UserError(f"{path} is not a readable safetensors file ({one_line(err)}): "
                        f"delete {path.parent} and rerun the same command") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path} holds weights of another model ({one_line(err)}): "
                        f"delete {path.parent} and rerun the same command") from None


def save_checkpoint(gen_dir: Path, epoch: int, model, optimizer, scaler, train_state: dict):
    """Write ckpt-<epoch>/ completely, point latest.json at it, then drop older ones."""
    final = gen_dir / f"ckpt-{epoch:04d}"
    with staged_dir(final) as staging:
        checksums = {MODEL: save_weights(model, staging / MODEL)}
        extra = {"optimizer": optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        if torch.cuda.is_initialized():  # a run on the GPU (not `accelerate launch --cpu`)
            extra["cuda_rng"] = torch.cuda.get_rng_state()
        # Serialised in memory first: torch.save reports a full disk as a RuntimeError.
        buffer = io.BytesIO()
        torch.save(extra, buffer)
        write_atomically(staging / STATE, lambda f: f.write(buffer.getbuffer()))
        checksums[STATE] = hashlib.sha256(buffer.getbuffer()).hexdigest()
        write_json(staging / TRAIN_STATE, {**train_state, SHA256: checksums})
    write_json(gen_dir / LATEST, {"epoch": epoch, "dir": final.name})
    for old in gen_dir.glob("ckpt-*"):
        if old != final:
            remove_dir(old)


def checkpoint_bytes(gen_dir: Path) -> int:
    """Bytes a generation's checkpoints take, staged and half-removed ones too."""
    return sum(tree_bytes(ckpt) for ckpt in gen_dir.glob("*ckpt-*"))


def drop_checkpoints(gen_dir: Path) -> None:
    """Remove a finished generation's checkpoints: last.safetensors holds its weights."""
    (gen_dir / LATEST).unlink(missing_ok=True)
    for ckpt in gen_dir.glob("ckpt-*"):
        remove_dir(ckpt)
    for trash in gen_dir.glob(".ckpt-*"):  # left by a kill during a removal or a save
        shutil.rmtree(trash)


def load_checkpoint(gen_dir: Path, model, optimizer, scaler) -> dict | None:
    """Restore the newest complete checkpoint of a generation; its train state, or None."""
    pointer = gen_dir / LATEST
    if not pointer.is_file():
        return None
    redo = (f"delete {gen_dir} and rerun the same command (that generation trains again "
            "from its first epoch)")
    try:
        name = json.loads(pointer.read_bytes())["dir"]
        ckpt = gen_dir / name
        if not (isinstance(name, str) and name.startswith("ckpt-") and ckpt.name == name):
            raise ValueError(name)
        train_state = json.loads((ckpt / TRAIN_STATE).read_bytes())
        checksums = train_state.pop(SHA256)
        damaged = [f for f in (MODEL, STATE) if sha256_file(ckpt / f) != checksums[f]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise UserError(f"{pointer} or the checkpoint it names is damaged: {redo}") from None
    if damaged:
        raise UserError(f"{ckpt / damaged[0]} is damaged (its sha256 differs from the one "
                        f"recorded when it was written): {redo}")
    load_weights(model, ckpt / MODEL)
    state = ckpt / STATE
    try:  # weights_only: a pickle that would build anything but plain tensors is refused
        extra = torch.load(state, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports damage and refusals with several types
        raise UserError(f"refusing {state}: not plain tensor data ({one_line(err)}): {redo}") \
            from None
    try:
        optimizer.load_state_dict(extra["optimizer"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["cpu_rng"])
        if "cuda_rng" in extra and torch.cuda.is_initialized():
            torch.cuda.set_rng_state(extra["cuda_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{state} does not match this run's optimizer ({one_line(err)}): "
                        f"{redo}") from None
    return train_state
