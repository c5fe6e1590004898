"""bench/compare_algos.py: argument checks, the per-run summary, and resuming where it stopped."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module():
    spec = importlib.util.spec_from_file_location("compare_algos", os.path.join(REPO, "bench", "compare_algos.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments():
    mod = _module()
    args = mod.parse_args(["--algos", "vineppo,grpo", "--seeds", "3,4,5", "--iterations", "7", "--",
                           "--rollout.num_prompts", "16"])
    assert args.algos == ["vineppo", "grpo"] and args.seeds == [3, 4, 5]
    assert args.train_args == ["--rollout.num_prompts", "16"]
    with pytest.raises(SystemExit):
        mod.parse_args(["--algos", "vineppo,dpo", "--iterations", "3"])
    with pytest.raises(SystemExit):         # no budget: iterations, or timings with a wall-clock
        mod.parse_args(["--algos", "vineppo"])
    assert mod.parse_args(["--time"]).time


def test_equal_wall_clock_from_quiet_timings(tmp_path):
    mod = _module()
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"algos": {"vineppo": {"seconds_per_iteration": 12.0},
                                          "ppo": {"seconds_per_iteration": 5.0}}}))
    args = mod.parse_args(["--timings", str(path), "--wall-seconds", "120"])
    assert mod.iterations_for(args, "vineppo") == 10 and mod.iterations_for(args, "ppo") == 24
    with pytest.raises(SystemExit, match="grpo"):
        mod.iterations_for(args, "grpo")
    assert mod.iterations_for(mod.parse_args(["--iterations", "6"]), "grpo") == 6


def _fake_run(path, algo, seed, accs):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"iteration": 0, "eval/accuracy": accs[0], "wall_clock_s": 0.0}) + "\n")
        for i, acc in enumerate(accs[1:], start=1):
            f.write(json.dumps({"iteration": i, "reward/mean": 0.5, "episodes": 128 * i, "wall_clock_s": 10.0 * i,
                                "tokens/generated": 100, "tokens/mc": 300, "eval/accuracy": acc}) + "\n")
    with open(os.path.join(path, "compare_done.json"), "w") as f:
        json.dump({"algo": algo, "seed": seed, "seconds": 1.0}, f)


def test_summary_and_finished_runs_are_kept(tmp_path, monkeypatch):
    mod = _module()
    run = tmp_path / "vineppo-seed0"
    _fake_run(str(run), "vineppo", 0, [0.3, 0.35, 0.5, 0.45])
    [row] = mod.summarize([str(run)])
    assert (row["algo"], row["seed"], row["iterations"], row["train_seconds"]) == ("vineppo", 0, 3, 30.0)
    assert (row["start_accuracy"], row["final_accuracy"], row["peak_accuracy"]) == (0.3, 0.45, 0.5)
    assert row["episodes"] == 384 and row["generated_tokens"] == 1200

    calls = []
    monkeypatch.setattr(mod, "_python", calls.append)
    args = mod.parse_args(["--out", str(tmp_path), "--iterations", "9"])
    assert mod.run_one(args, "vineppo", 0) == str(run) and calls == []      # finished: not run again
    os.makedirs(tmp_path / "ppo-seed1" / "checkpoints")                      # interrupted: resumed
    monkeypatch.setattr(mod, "_python", lambda cmd: calls.append(cmd))
    mod.run_one(args, "ppo", 1)
    assert calls[0][calls[0].index("--resume") + 1] == str(tmp_path / "ppo-seed1")
    assert calls[0][calls[0].index("--run.max_iterations") + 1] == "9"
    assert calls[0][calls[0].index("--run.max_train_minutes") + 1] == "0.0"      # no wall-clock cap
    assert os.path.isfile(tmp_path / "ppo-seed1" / "compare_done.json")


def test_aggregate_over_seeds(tmp_path):
    mod = _module()
    _fake_run(str(tmp_path / "a0"), "vineppo", 0, [0.3, 0.4, 0.6])
    _fake_run(str(tmp_path / "a1"), "vineppo", 1, [0.3, 0.5, 0.4])
    _fake_run(str(tmp_path / "b0"), "ppo", 0, [0.3, 0.35, 0.36])
    rows = mod.summarize([str(tmp_path / n) for n in ("a0", "a1", "b0")])
    agg = mod.aggregate(rows, {"vineppo": 12.0})
    v = agg["vineppo"]
    assert v["final_accuracy"]["min"] == 0.4 and v["final_accuracy"]["max"] == 0.6
    assert abs(v["final_accuracy"]["mean"] - 0.5) < 1e-9 and v["peak_accuracy"]["seeds"] == [0.6, 0.5]
    assert v["mean_curve_peak"]["iteration"] == 2 and abs(v["mean_curve_peak"]["accuracy"] - 0.5) < 1e-9
    assert v["seconds_per_iteration"] == 12.0 and "seconds_per_iteration" not in agg["ppo"]
    for e in agg.values():
        e["_band"] = {i: (a, a) for i, a in e["mean_curve"]}
    mod.plot_equal_time(agg, str(tmp_path / "eq.png"))
    assert os.path.getsize(tmp_path / "eq.png") > 1000
