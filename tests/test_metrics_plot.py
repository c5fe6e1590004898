import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import vineppo.metrics as metrics_mod
from vineppo.metrics import (MetricsLogger, SampleRecord, SampleWriter, read_jsonl, read_metrics)
from vineppo.plot import (aggregate, format_summary_table, group_runs, load_run, main,
                          plot_runs, summary_rows)


# ---- metrics ---------------------------------------------------------------------------------

def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    run = str(tmp_path)
    with MetricsLogger(run) as log:
        rec = log.log(1, {"wall_clock_s": 1.5, "reward/mean": torch.tensor(0.25),
                          "loss/policy": np.float32(-0.5), "tokens/generated": np.int64(7),
                          "loss/total": float("nan"), "note": "warmup"})
        log.log(2, {"wall_clock_s": 3.0, "reward/mean": 0.5})
    assert rec["reward/mean"] == 0.25 and rec["tokens/generated"] == 7
    lines = read_metrics(run)
    assert [r["iteration"] for r in lines] == [1, 2]
    assert lines[0]["loss/total"] is None          # NaN is logged as null, not hidden
    assert lines[0]["loss/policy"] == -0.5 and lines[0]["note"] == "warmup"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    ev = acc.Scalars("reward/mean")
    assert [(e.step, e.value) for e in ev] == [(1, 0.25), (2, 0.5)]


def test_logger_rejects_bad_records(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as log:
        with pytest.raises(ValueError, match="wall_clock_s"):
            log.log(1, {"reward/mean": 1.0})
        with pytest.raises(ValueError, match="scalar"):
            log.log(1, {"wall_clock_s": 1.0, "x": torch.zeros(3)})
        with pytest.raises(ValueError, match="iteration"):
            log.log(-1, {"wall_clock_s": 1.0})


def test_logger_without_tensorboard_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import now fails
    monkeypatch.setattr(metrics_mod, "_tensorboard_warned", False)
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        log = MetricsLogger(str(tmp_path / "a"))
    log.log(0, {"wall_clock_s": 0.0})
    log.close()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsLogger(str(tmp_path / "b")).close()
    assert read_metrics(str(tmp_path / "a")) == [{"iteration": 0, "wall_clock_s": 0.0}]
    assert not os.path.exists(tmp_path / "a" / "tensorboard")


def test_resume_drops_later_lines(tmp_path):
    run = str(tmp_path)
    with MetricsLogger(run) as log:
        for it in range(1, 6):
            log.log(it, {"wall_clock_s": float(it), "reward/mean": it / 10})
    with MetricsLogger(run, resume_iteration=3) as log:
        log.log(4, {"wall_clock_s": 4.5, "reward/mean": 0.99})
    recs = read_metrics(run)
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["reward/mean"] == 0.99
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    pts = [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/mean")]
    assert pts == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.99)]


def test_read_skips_a_cut_short_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "wall_clock_s": 1.0}\n{"iteration": 2, "wall_cl')
    with pytest.warns(UserWarning, match="not valid JSON"):
        recs = read_metrics(str(tmp_path))
    assert recs == [{"iteration": 1, "wall_clock_s": 1.0}]


def test_sample_writer(tmp_path):
    rec = SampleRecord(example_id="q1", prompt="1+1=", response="a\nb", reward=1.0,
                       steps=["a\n", "b"], step_values=[0.5, float("nan")],
                       step_advantages=[0.25, 0.5], finish_reason="stop", group_id=3)
    with SampleWriter(str(tmp_path)) as w:
        assert w.write(7, [rec, rec]) == 2
        with pytest.raises(ValueError, match="step_values"):
            w.write(7, [SampleRecord("q", "p", "r", 0.0, steps=["r"], step_values=[1.0, 2.0])])
    out = read_jsonl(str(tmp_path / "samples.jsonl"))
    assert len(out) == 2
    assert out[0]["iteration"] == 7 and out[0]["steps"] == ["a\n", "b"]
    assert out[0]["step_values"] == [0.5, None] and out[0]["step_advantages"] == [0.25, 0.5]
    assert "".join(out[0]["steps"]) == out[0]["response"]


# ---- plot ------------------------------------------------------------------------------------

# eval accuracy at iterations 0, 2, 4, 6 of each (algo, seed) and seconds per iteration
EVAL = {("ppo", 0): [0.2, 0.3, 0.4, 0.4], ("ppo", 1): [0.2, 0.3, 0.5, 0.4],
        ("vineppo", 0): [0.2, 0.4, 0.5, 0.6], ("vineppo", 1): [0.2, 0.5, 0.5, 0.6]}
SEC_PER_ITER = {("ppo", 0): 5.0, ("ppo", 1): 5.0, ("vineppo", 0): 10.0, ("vineppo", 1): 12.0}


def write_run(root, algo, seed):
    run = os.path.join(root, f"{algo}-s{seed}")
    os.makedirs(run)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"algo": algo, "seed": seed, "run_dir": run,
                   "rollout": {"num_samples": 8, "seed": seed}, "lr": 1e-6}, f)
    sec = SEC_PER_ITER[(algo, seed)]
    with MetricsLogger(run, tensorboard=False) as log:
        for it in range(0, 7):
            if it > 0:
                log.log(it, {"wall_clock_s": it * sec, "train/grad_steps": 16 * it,
                             "reward/mean": 0.1 * it + 0.01 * seed + (0.05 if algo == "vineppo" else 0)})
            if it % 2 == 0:
                log.log(it, {"wall_clock_s": it * sec, "eval/accuracy": EVAL[(algo, seed)][it // 2]})
    return run


@pytest.fixture
def runs(tmp_path):
    return [write_run(str(tmp_path), a, s) for a in ("ppo", "vineppo") for s in (0, 1)]


def test_grouping_by_seed(runs):
    groups = group_runs([load_run(r) for r in runs], by_seed=True)
    assert [g.label for g in groups] == ["algo=ppo (2 seeds)", "algo=vineppo (2 seeds)"]
    assert [len(g.runs) for g in groups] == [2, 2]
    single = group_runs([load_run(r) for r in runs], by_seed=False)
    assert [g.label for g in single] == ["algo=ppo, seed=0", "algo=ppo, seed=1",
                                         "algo=vineppo, seed=0", "algo=vineppo, seed=1"]


def test_aggregate_mean_and_band(runs):
    groups = group_runs([load_run(r) for r in runs], by_seed=True)
    c = aggregate(groups[0], "eval/accuracy", "iteration")
    np.testing.assert_allclose(c.x, [0, 2, 4, 6])
    np.testing.assert_allclose(c.mean, [0.2, 0.3, 0.45, 0.4])
    np.testing.assert_allclose(c.low, [0.2, 0.3, 0.4, 0.4])
    np.testing.assert_allclose(c.high, [0.2, 0.3, 0.5, 0.4])
    s = aggregate(groups[0], "eval/accuracy", "iteration", band="std")
    np.testing.assert_allclose(s.high - s.mean, [0, 0, math.sqrt(0.005), 0], atol=1e-12)
    # vineppo over wall-clock: seed 0 evals at 0, 20, 40, 60 s; seed 1 at 0, 24, 48, 72 s;
    # the common range is [0, 60]; at t = 24 seed 0 interpolates 0.4 + (4/20) * 0.1 = 0.42
    w = aggregate(groups[1], "eval/accuracy", "wall_clock_s")
    np.testing.assert_allclose(w.x, [0, 20, 24, 40, 48, 60])
    i24 = list(w.x).index(24)
    assert w.mean[i24] == pytest.approx((0.42 + 0.5) / 2)
    with pytest.raises(ValueError, match="band"):
        aggregate(groups[0], "eval/accuracy", band="iqr")


def test_summary_rows_hand_computed(runs):
    rows = summary_rows(runs, reference="ppo")
    ppo, vine = rows
    assert ppo.peak_accuracy == pytest.approx(0.45) and ppo.peak_iteration == 4
    assert ppo.peak_accuracy_std == pytest.approx(math.sqrt(0.005))
    assert ppo.target_accuracy == pytest.approx(0.45)
    assert ppo.iterations_to_target == 4 and ppo.time_to_target_s == pytest.approx(20.0)
    assert ppo.grad_steps_to_target == pytest.approx(64)
    # vineppo's seed mean is 0.45 at iteration 2: 20 s and 24 s -> 22 s, 32 gradient steps
    assert vine.peak_accuracy == pytest.approx(0.6) and vine.peak_iteration == 6
    assert vine.iterations_to_target == 2 and vine.time_to_target_s == pytest.approx(22.0)
    assert vine.grad_steps_to_target == pytest.approx(32)
    rows = summary_rows(runs, target_accuracy=0.55)
    assert rows[0].iterations_to_target is None and rows[1].iterations_to_target == 6
    table = format_summary_table(rows)
    assert table.count("\n") == 3 and "| algo=ppo (2 seeds) | 2 | 0.450 ± 0.071 | 4 | - | - | - |" in table
    with pytest.raises(ValueError, match="matches 0 groups"):
        summary_rows(runs, reference="grpo")


def test_plot_writes_png(runs, tmp_path, capsys):
    out = str(tmp_path / "figs" / "curves.png")
    assert plot_runs(runs, out, group_by_seed=True) == out
    with open(out, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    out2 = str(tmp_path / "cli.png")
    with pytest.raises(SystemExit):   # 'ppo' names two runs when seeds are not grouped
        main(runs + ["--out", out2, "--table", "--reference", "ppo"])
    assert main(runs + ["--out", out2, "--table", "--reference", "ppo", "--band", "std",
                        "--group-by-seed"]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out2}" in printed.err and printed.out.startswith("| run |")
    assert "algo=vineppo (2 seeds)" in printed.out
    assert os.path.getsize(out2) > 20_000
    # one line per run (no grouping) draws too, and the default output goes beside the runs
    assert main(runs) == 0
    assert os.path.getsize(os.path.join(os.path.dirname(runs[0]), "curves.png")) > 20_000
