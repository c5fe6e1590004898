"""Atomic training checkpoints that a run can resume from bit for bit.

Layout of ``run_dir/checkpoints/iter_000012/``::

    model/                 save_pretrained (safetensors) of the policy (+ tokenizer when given)
    value_model/           the PPO critic (save_pretrained, or safetensors of its state dict)
    optimizer.pt           torch.save of optimizer.state_dict()   (value_optimizer.pt likewise)
    scheduler.pt           torch.save of scheduler.state_dict()   (value_scheduler.pt likewise)
    rng.pt                 python random, numpy, torch CPU and CUDA generator states, per rank
    trainer_state.json     the run's TrainState and config (written last)

A checkpoint is written into a hidden temporary folder beside its final place, every file is
fsynced, and the folder is then renamed into place: a crash at any point leaves either the
previous checkpoints only or the new one complete, never a half-written ``iter_*`` folder.
Temporary folders left by a crash are ignored by ``latest_checkpoint`` and removed by the next
``save_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

from vineppo.models import quiet_transformers

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME_RE = re.compile(r"^iter_(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


@dataclass
class TrainState:
    """Where a run stands besides its tensors: everything else a resumed run needs."""

    iteration: int = 0              # iterations completed (the data position is iteration * num_prompts)
    optimizer_steps: int = 0
    nan_skips: int = 0
    episodes: int = 0               # episodes trained on so far
    train_seconds: float = 0.0      # wall clock of training iterations (eval and checkpoints excluded)
    last_eval_iteration: int = -1
    last_saved_iteration: int = -1


# ---- RNG -------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and (when available) every CUDA device's generator state."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- filesystem helpers ----------------------------------------------------------------------

def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; rename is still atomic
        pass
    finally:
        os.close(fd)


def _complete_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _NAME_RE.match(name)
        path = os.path.join(ckpt_root, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _remove_leftovers(ckpt_root: str, keep: str | None = None) -> None:
    for name in os.listdir(ckpt_root):
        path = os.path.join(ckpt_root, name)
        if path != keep and (name.startswith(_TMP_PREFIX) or name.startswith(_TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def _discard(path: str) -> None:
    """Rename first so that a crash mid-delete never leaves a half-deleted ``iter_*`` folder."""
    trash = os.path.join(os.path.dirname(path), f"{_TRASH_PREFIX}{uuid.uuid4().hex}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _save_module(module: torch.nn.Module, directory: str, state_dict: dict | None,
                 tokenizer=None) -> None:
    os.makedirs(directory, exist_ok=True)
    if hasattr(module, "save_pretrained"):
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        with quiet_transformers():
            module.save_pretrained(directory, **kwargs)
    else:
        if state_dict is None:
            save_model(module, os.path.join(directory, "model.safetensors"))
        else:
            save_file({k: v.contiguous() for k, v in state_dict.items()},
                      os.path.join(directory, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _state(obj) -> dict:
    return obj if isinstance(obj, dict) else obj.state_dict()


# ---- public API ------------------------------------------------------------------------------

def checkpoint_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR, f"iter_{iteration:06d}")


def save_checkpoint(run_dir: str, state: TrainState, model: torch.nn.Module, optimizer=None,
                    scheduler=None, *, value_model: torch.nn.Module | None = None,
                    value_optimizer=None, value_scheduler=None, tokenizer=None,
                    config: Any = None, keep_last: int = 2,
                    model_state_dict: dict | None = None,
                    value_model_state_dict: dict | None = None,
                    rng_states: list[dict] | None = None) -> str:
    """Write the checkpoint of ``state.iteration`` atomically and keep the newest ``keep_last``.

    ``optimizer`` / ``scheduler`` (and the value ones) may be objects or already-gathered state
    dicts (FSDP2: pass full state dicts from ``torch.distributed.checkpoint.state_dict``;
    likewise ``model_state_dict``). ``rng_states``: one ``capture_rng_state()`` per rank, rank
    order (default: this process only). ``config`` may be a dataclass or a dict. Call on one
    process only. Returns the checkpoint folder.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    iteration = state.iteration
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    # fail before writing anything when the state cannot be stored as JSON
    try:
        state_json = json.dumps({"state": dataclasses.asdict(state), "config": config or {}}, indent=2,
                                allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"trainer state or config is not JSON-serialisable: {e}") from e

    ckpt_root = os.path.join(run_dir, CHECKPOINT_DIR)
    os.makedirs(ckpt_root, exist_ok=True)
    _remove_leftovers(ckpt_root)
    final = checkpoint_path(run_dir, iteration)
    tmp = os.path.join(ckpt_root, f"{_TMP_PREFIX}{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        _save_module(model, os.path.join(tmp, "model"), model_state_dict, tokenizer)
        if value_model is not None:
            _save_module(value_model, os.path.join(tmp, "value_model"), value_model_state_dict)
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler),
                          ("value_optimizer", value_optimizer),
                          ("value_scheduler", value_scheduler)):
            if obj is not None:
                torch.save(_state(obj), os.path.join(tmp, f"{name}.pt"))
        torch.save(rng_states if rng_states is not None else [capture_rng_state()],
                   os.path.join(tmp, "rng.pt"))
        # the state file goes last: its presence marks a complete checkpoint
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            f.write(state_json)
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving an iteration (e.g. after a resume): replace it
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _complete_checkpoints(ckpt_root)[:-keep_last]:
        _discard(old)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = _complete_checkpoints(os.path.join(run_dir, CHECKPOINT_DIR))
    return found[-1][1] if found else None


def read_trainer_state(path: str) -> TrainState:
    with open(os.path.join(path, STATE_FILE)) as f:
        return TrainState(**json.load(f)["state"])


def read_checkpoint_config(path: str) -> dict:
    """The config the run that wrote checkpoint `path` ran with."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)["config"]


def read_model_state_dict(path: str, subdir: str = "model") -> dict[str, torch.Tensor]:
    """The tensors saved under ``path/subdir`` (all safetensors shards merged)."""
    directory = os.path.join(path, subdir)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no safetensors files in {directory}")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    return state


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{where}: unexpected keys in checkpoint: {unexpected[:5]}")
    # save_pretrained drops tied parameters (e.g. lm_head sharing the embedding); a missing key is
    # fine only when its tensor is shared with one that was loaded
    params = dict(module.state_dict(keep_vars=True))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    really_missing = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]
    if really_missing:
        raise ValueError(f"{where}: keys missing from checkpoint: {really_missing[:5]}")


def load_checkpoint(path: str, model: torch.nn.Module | None = None, optimizer=None,
                    scheduler=None, *, value_model: torch.nn.Module | None = None,
                    value_optimizer=None, value_scheduler=None, restore_rng: bool = True,
                    rank: int = 0, map_location: str | torch.device = "cpu") -> TrainState:
    """Load a checkpoint into the given objects in place and return the trainer state.

    Restores every RNG (of ``rank``) when ``restore_rng``, so the next random draws equal those
    of the run that wrote the checkpoint. Objects passed as None are left alone.
    """
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    if model is not None:
        load_module_state(model, read_model_state_dict(path, "model"), "model")
    if value_model is not None:
        load_module_state(value_model, read_model_state_dict(path, "value_model"), "value_model")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler),
                      ("value_optimizer", value_optimizer), ("value_scheduler", value_scheduler)):
        if obj is None:
            continue
        file = os.path.join(path, f"{name}.pt")
        if not os.path.isfile(file):
            raise ValueError(f"{path} has no {name} state")
        obj.load_state_dict(torch.load(file, map_location=map_location, weights_only=True))
    if restore_rng:
        states = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
        if rank >= len(states):
            raise ValueError(f"checkpoint holds RNG states of {len(states)} ranks, not rank {rank}")
        restore_rng_state(states[rank])
    return read_trainer_state(path)
