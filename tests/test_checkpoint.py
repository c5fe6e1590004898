import json
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from vineppo.checkpoint import (CHECKPOINT_DIR, TrainState, capture_rng_state, latest_checkpoint,
                                load_checkpoint, read_checkpoint_config, read_trainer_state, restore_rng_state,
                                save_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY = dict(vocab=37, hidden=16, intermediate=32, heads=2, kv_heads=1, max_positions=64, tied=True)


def at(iteration: int, **fields) -> TrainState:
    return TrainState(iteration=iteration, **fields)


class Critic(torch.nn.Module):  # a module without save_pretrained
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def make_opt(model, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * (1 - s / 50))
    return opt, sched


def train_steps(model, opt, sched, critic, copt, n):
    """n update steps whose data come from every global RNG; returns the draws."""
    draws = []
    for _ in range(n):
        ids = torch.randint(0, 37, (2, 7))
        noise = float(np.random.rand()) + random.random()
        draws.append((ids.tolist(), noise))
        loss = model(input_ids=ids, labels=ids).loss * (1 + noise)
        loss = loss + critic(torch.randn(3, 4)).pow(2).mean()
        opt.zero_grad()
        copt.zero_grad()
        loss.backward()
        opt.step()
        copt.step()
        sched.step()
    return draws


@dataclass
class Cfg:
    lr: float = 1e-2
    seed: int = 3


def test_round_trip_continues_bit_for_bit(tmp_path, tiny_lm):
    run = str(tmp_path / "run")
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model = tiny_lm(seed=1, **TINY).train()
    critic = Critic()
    opt, sched = make_opt(model)
    copt = torch.optim.SGD(critic.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, sched, critic, copt, 2)
    saved = at(2, optimizer_steps=4, nan_skips=1, episodes=64, train_seconds=12.5, last_eval_iteration=2,
               last_saved_iteration=2)
    path = save_checkpoint(run, saved, model, opt, sched, value_model=critic, value_optimizer=copt,
                           config=Cfg())
    assert path == latest_checkpoint(run)
    assert os.path.isfile(os.path.join(path, "model", "model.safetensors"))
    draws_a = train_steps(model, opt, sched, critic, copt, 3)
    params_a = {k: v.clone() for k, v in model.state_dict().items()}
    critic_a = {k: v.clone() for k, v in critic.state_dict().items()}
    lr_a = sched.get_last_lr()

    # a fresh process state: different weights, fresh optimizers, scrambled RNGs
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    model2 = tiny_lm(seed=5, **TINY).train()
    critic2 = Critic()
    opt2, sched2 = make_opt(model2)
    copt2 = torch.optim.SGD(critic2.parameters(), lr=0.1, momentum=0.9)
    state = load_checkpoint(path, model2, opt2, sched2, value_model=critic2, value_optimizer=copt2)
    assert state == saved and state.iteration == 2 and state.train_seconds == 12.5
    assert read_checkpoint_config(path) == {"lr": 1e-2, "seed": 3}
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
    draws_b = train_steps(model2, opt2, sched2, critic2, copt2, 3)
    assert draws_b == draws_a
    for k, v in model2.state_dict().items():
        assert torch.equal(v, params_a[k]), k
    for k, v in critic2.state_dict().items():
        assert torch.equal(v, critic_a[k]), k
    assert sched2.get_last_lr() == lr_a


def test_rng_capture_restore():
    state = capture_rng_state()
    a = (random.random(), float(np.random.randn()), torch.rand(3).tolist())
    restore_rng_state(state)
    b = (random.random(), float(np.random.randn()), torch.rand(3).tolist())
    assert a == b


def test_keep_last_and_resave(tmp_path):
    run = str(tmp_path)
    critic = Critic()
    for it in (1, 2, 3, 4):
        save_checkpoint(run, at(it, episodes=it), critic, keep_last=2)
    names = sorted(os.listdir(os.path.join(run, CHECKPOINT_DIR)))
    assert names == ["iter_000003", "iter_000004"]
    p = save_checkpoint(run, at(4, episodes=99), critic, keep_last=2)
    assert read_trainer_state(p).episodes == 99
    assert sorted(os.listdir(os.path.join(run, CHECKPOINT_DIR))) == names


def test_bad_inputs(tmp_path):
    critic = Critic()
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(str(tmp_path), at(1), critic, config={"x": object()})
    assert latest_checkpoint(str(tmp_path)) is None
    p = save_checkpoint(str(tmp_path), at(1), critic)
    with pytest.raises(ValueError, match="no optimizer"):
        load_checkpoint(p, critic, optimizer=torch.optim.SGD(critic.parameters(), lr=0.1))
    other = torch.nn.Linear(4, 8)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_checkpoint(p, other)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(str(tmp_path), critic)


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    import vineppo.checkpoint as ck
    real_save = torch.save
    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if str(f).endswith("optimizer.pt"):
            os._exit(17)   # killed mid-write: no cleanup code runs
    ck.torch.save = dying_save
    torch.manual_seed(1)
    m = torch.nn.Linear(3, 2)
    ck.save_checkpoint({run!r}, ck.TrainState(iteration=2), m, torch.optim.SGD(m.parameters(), lr=0.1), keep_last=1)
""")


def test_crash_mid_write_keeps_previous(tmp_path):
    run = str(tmp_path / "run")
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    first = save_checkpoint(run, at(1, episodes=8), m, opt, keep_last=1)
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT.format(repo=REPO, run=run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    ckpt_root = os.path.join(run, CHECKPOINT_DIR)
    leftovers = [n for n in os.listdir(ckpt_root) if n.startswith(".tmp-")]
    assert len(leftovers) == 1                      # the crash left a partial temp folder
    assert latest_checkpoint(run) == first          # ... which is ignored
    m2 = torch.nn.Linear(3, 2)
    state = load_checkpoint(first, m2, torch.optim.SGD(m2.parameters(), lr=0.1))
    assert state.iteration == 1 and state.episodes == 8
    assert torch.equal(m2.weight, m.weight)
    # the next save removes the leftover
    save_checkpoint(run, at(2), m, opt, keep_last=1)
    assert sorted(os.listdir(ckpt_root)) == ["iter_000002"]


def test_exception_mid_write_cleans_up(tmp_path, monkeypatch):
    import vineppo.checkpoint as ck
    run = str(tmp_path)
    m = torch.nn.Linear(3, 2)
    first = save_checkpoint(run, at(1), m)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "_fsync_tree", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, at(2), m)
    assert os.listdir(os.path.join(run, CHECKPOINT_DIR)) == ["iter_000001"]
    assert latest_checkpoint(run) == first
    with open(os.path.join(first, "trainer_state.json")) as f:
        assert json.load(f)["state"]["iteration"] == 1
