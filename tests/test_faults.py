"""Faults and bad input at the command line: one clear message before any work, and nothing lost.

Bad values stop `python -m vineppo.train` before it makes a run folder; bad data names its file
and line; signals stop at a safe point and say how to resume; a full disk keeps the last good
checkpoint; a killed run resumes to the same result; a small KV pool changes nothing.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from vineppo.metrics import read_metrics
from vineppo.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("time/", "wall_clock_s", "eval/seconds")


def run_main(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def results(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in read_metrics(str(run_dir))]


@pytest.mark.parametrize("flag, value, message", [
    ("--ppo.lr", "-0.001", "--ppo.lr must be > 0"),
    ("--engine.page_size", "0", "--engine.page_size must be >= 1"),
    ("--ppo.clip_range", "-1", "--ppo.clip_range must be > 0"),
    ("--rollout.top_p", "0", "--rollout.top_p must be in (0, 1]"),
    ("--rollout.mc_rollouts", "0", "--rollout.mc_rollouts must be >= 1"),
    ("--task.on_error", "bogus", "--task.on_error must be one of raise, skip"),
    ("--ppo.minibatch_size", "3", "--ppo.minibatch_size (3) must divide"),
])
def test_bad_values_stop_before_any_work(flag, value, message, tiny_model_dir, train_args, tmp_path, capsys):
    code, _, err = run_main(train_args(tiny_model_dir, tmp_path / "run", "vineppo", flag, value), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _gsm8k(folder, train_lines: list[bytes]):
    folder.mkdir()
    good = b'{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
    (folder / "train.jsonl").write_bytes(b"".join(train_lines or [good]))
    (folder / "test.jsonl").write_bytes(good * 2)
    return good


def test_bad_data_rows_name_file_and_line(tiny_model_dir, train_args, tmp_path, capsys):
    good = b'{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
    bad_byte = b'{"question": "What is 2 + 2? caf\xe9", "answer": "#### 4"}\n'
    bad_gold = b'{"question": "What is 3 + 3?", "answer": "3 + 3 = 6\\n#### abc"}\n'
    data = tmp_path / "gsm8k"
    _gsm8k(data, [good, bad_byte, good, bad_gold, good])
    args = train_args(tiny_model_dir, tmp_path / "run", "grpo", "--task.name", "gsm8k", "--task.path", str(data),
                      "--ppo.num_iterations", "1")
    code, _, err = run_main(args, capsys)
    assert code == 2 and "train.jsonl:2" in err and "UTF-8" in err
    assert not (tmp_path / "run").exists()
    # skipped and counted; the run trains on the rest
    main(args + ["--task.on_error", "skip", "--eval.at_start", "false"])
    out, _ = capsys.readouterr()
    assert "done: 1 iterations" in out


def test_prompt_longer_than_the_context(tiny_model_dir, train_args, tmp_path, capsys):
    long = json.dumps({"question": "1 + " * 300 + "1?", "answer": "#### 301"}).encode() + b"\n"
    good = _gsm8k(tmp_path / "gsm8k", [])
    (tmp_path / "gsm8k" / "train.jsonl").write_bytes(good + long + good)
    args = train_args(tiny_model_dir, tmp_path / "run", "grpo", "--task.name", "gsm8k",
                      "--task.path", str(tmp_path / "gsm8k"), "--ppo.num_iterations", "1")
    code, _, err = run_main(args, capsys)
    assert code == 2 and "train problem" in err and "context holds 512" in err and "--task.on_error skip" in err
    assert not (tmp_path / "run").exists()
    main(args + ["--task.on_error", "skip", "--eval.at_start", "false"])
    out, _ = capsys.readouterr()
    assert "skipped 1 train and 0 test problems" in out and "done: 1 iterations" in out


def test_kv_pool_too_small_for_one_sequence(tiny_model_dir, train_args, tmp_path, capsys):
    code, _, err = run_main(train_args(tiny_model_dir, tmp_path / "run", "grpo", "--engine.num_pages", "1"), capsys)
    assert code == 2 and "--engine.num_pages 1 is too small" in err
    assert not (tmp_path / "run").exists()


def test_small_kv_pool_preempts_and_changes_nothing(tiny_model_dir, train_args, tmp_path, capsys):
    """8 pages of 16 tokens hold a few of the iteration's sequences at once: the engine preempts
    and recomputes, and the run samples the same tokens: every reward, loss and update equals the
    large pool's (a recomputed prefix scores its tokens equal to rounding, ~1e-7)."""
    greedy = ("--eval.temperature", "0")
    main(train_args(tiny_model_dir, tmp_path / "big", "vineppo", "--ppo.num_iterations", "1", *greedy))
    main(train_args(tiny_model_dir, tmp_path / "small", "vineppo", "--ppo.num_iterations", "1", *greedy,
                    "--engine.num_pages", "8"))
    capsys.readouterr()
    big, small = results(tmp_path / "big"), results(tmp_path / "small")
    for a, b in zip(big, small):
        for k in [k for k in a if k.startswith("policy/engine_")]:
            assert a.pop(k) == pytest.approx(b.pop(k), abs=1e-6)
    assert small == big
    samples = lambda d: [json.loads(line)["response"] for line in open(d / "samples.jsonl")]   # noqa: E731
    assert samples(tmp_path / "small") == samples(tmp_path / "big")


def test_full_disk_keeps_the_last_good_checkpoint(tiny_model_dir, train_args, tmp_path, capsys, monkeypatch):
    from vineppo import checkpoint

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "iter_000002" in str(f):
            raise OSError(28, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code, _, err = run_main(train_args(tiny_model_dir, tmp_path / "run", "grpo"), capsys)
    assert code == 1 and "No space left on device" in err and "iter_000002" in err
    assert "Traceback" not in err and "last checkpoint:" in err and "iter_000001" in err
    assert f"python -m vineppo.train --resume {tmp_path / 'run'}" in err
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["iter_000001"]
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(str(tmp_path / "run"))).iteration == 1


def test_resume_keeps_the_runs_display_settings(tiny_model_dir, train_args, tmp_path):
    from vineppo.config import load_config
    from vineppo.train import resume_config

    args = train_args(tiny_model_dir, tmp_path / "run", "grpo", "--run.num_logged_samples", "1")
    load_config(args).save(str(_mkdir(tmp_path / "run")))
    again = ["--resume", str(tmp_path / "run"), "--max-iterations", "3"]
    cfg = resume_config(load_config(again), again)
    assert cfg.run.progress is False and cfg.run.tensorboard is False and cfg.run.num_logged_samples == 1
    assert cfg.run.max_iterations == 3
    with pytest.raises(ValueError, match="only run.\\* options apply, not --ppo.lr"):
        bad = again + ["--ppo.lr", "0.1"]
        resume_config(load_config(bad), bad)


def _mkdir(path):
    path.mkdir()
    return path


# -- faults of a whole process: signals, kill -9, NaN -------------------------------------------

def _subprocess(argv, script: str = "", **kw) -> subprocess.Popen:
    """`python -m vineppo.train argv`, with `script` run first in the same interpreter (to plant a
    fault)."""
    code = textwrap.dedent(script) + "\nimport sys, runpy\nsys.argv = ['vineppo.train'] + sys.argv[1:]\n" \
        "runpy.run_module('vineppo.train', run_name='__main__')\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(proc, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    for line in proc.stdout:
        if text in line:
            return
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"never saw {text!r}; stderr: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_stop_with_a_checkpoint_and_the_resume_command(sig, code, tiny_model_dir, train_args, tmp_path):
    run = tmp_path / "run"
    proc = _subprocess(train_args(tiny_model_dir, run, "vineppo", "--ppo.num_iterations", "20"))
    _wait_for(proc, "iter_000001 (")   # the first checkpoint is written
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and f"interrupted by {sig.name}" in err
    assert "last checkpoint:" in err and f"python -m vineppo.train --resume {run}" in err
    from vineppo.checkpoint import latest_checkpoint, read_trainer_state

    done = read_trainer_state(latest_checkpoint(str(run))).iteration
    assert 1 <= done < 20
    if sig == signal.SIGINT:   # the interrupted iteration was finished and saved
        assert done >= 2


def test_kill_during_a_checkpoint_write_then_resume(tiny_model_dir, train_args, tmp_path):
    """kill -9 while iteration 2's checkpoint is being written; the resumed run ends where an
    uninterrupted one does, metric for metric."""
    straight = tmp_path / "straight"
    main(train_args(tiny_model_dir, straight, "vineppo", "--ppo.num_iterations", "3"))
    run = tmp_path / "run"
    args = train_args(tiny_model_dir, run, "vineppo", "--ppo.num_iterations", "3")
    killer = """
        import os, signal, torch
        import vineppo.checkpoint as ck
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if "iter_000002" in str(f) and str(f).endswith("optimizer.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
        ck.torch.save = dying_save
    """
    proc = _subprocess(args, killer)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    from vineppo.checkpoint import latest_checkpoint

    assert latest_checkpoint(str(run)).endswith("iter_000001")   # the half-written one is ignored
    resumed = _subprocess(["--resume", str(run)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "done: 3 iterations" in out
    train_lines = lambda d: [m for m in results(d) if "reward/mean" in m]   # noqa: E731
    assert train_lines(run) == train_lines(straight)


def test_nan_losses_stop_with_the_last_checkpoint(tiny_model_dir, train_args, tmp_path):
    run = tmp_path / "run"
    nan_after_first_iteration = """
        import vineppo.algos as algos
        real, calls = algos.policy_loss, [0]
        def poisoned(*a, **k):
            loss, stats = real(*a, **k)
            calls[0] += 1
            return (loss * float("nan") if calls[0] > 16 else loss), stats   # from iteration 2 on
        algos.policy_loss = poisoned
    """
    proc = _subprocess(train_args(tiny_model_dir, run, "grpo", "--run.max_nan_skips", "2"), nan_after_first_iteration)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "run.max_nan_skips=2" in err and "last checkpoint:" in err and "iter_000001" in err
