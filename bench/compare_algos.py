"""VinePPO against PPO, GRPO and RLOO: learning curves over seeds, on equal footing.

    python bench/compare_algos.py [--preset tiny] [--algos vineppo,ppo,grpo,rloo] [--seeds 0,1,2]
                                  [--train-minutes 3] [--out runs/compare] [-- TRAIN OPTIONS ...]

Every (algo, seed) run starts from the same SFT checkpoint (trained once, up front, outside every
budget), sees the same number of episodes per iteration (the preset's rollout.num_prompts x
rollout.num_samples), and trains for the same budget of training time (`run.max_train_minutes`:
iterations only; the periodic test evaluations are not charged to any algorithm). The learning
rate schedule is laid out over `--iterations` for every algorithm, longer than any of them gets
within the budget, so all of them train at the same learning rate per iteration.

Each run gets its own folder `<out>/<algo>-seed<seed>`; a finished run is kept and skipped when
the command is repeated, an interrupted one resumes from its last checkpoint. Then the curves
(test accuracy against iterations and against training time, mean and min-max band over seeds)
go to `<out>/curves.png` and the table (peak accuracy; time, iterations and gradient steps to
reach PPO's peak) to `<out>/table.md`, both from `python -m vineppo.plot`. `<out>/summary.json`
holds the per-run numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vineppo.algos import ALGOS  # noqa: E402

DONE_FILE = "compare_done.json"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="train preset (configs/NAME.yaml)")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of " + ", ".join(ALGOS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds (at least 3 for a spread)")
    p.add_argument("--train-minutes", type=float, default=3.0, help="training-time budget of every run")
    p.add_argument("--iterations", type=int, default=400,
                   help="length of the learning-rate schedule (more than any run reaches in the budget)")
    p.add_argument("--eval-every", type=int, default=5, help="test evaluation every this many iterations")
    p.add_argument("--out", default="runs/compare", help="parent folder of the run folders")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: options passed to every `python -m vineppo.train`")
    args = p.parse_args(argv)
    args.algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(args.algos) - set(ALGOS))
    if unknown:
        p.error(f"unknown algos {unknown}; choose from {list(ALGOS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return args


def _python(module_args: list[str]) -> None:
    cmd = [sys.executable, "-m", *module_args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_sft(args) -> None:
    """Trains the shared SFT checkpoint (if missing) before any run starts its clock."""
    from vineppo.config import load_config

    cfg = load_config(["--preset", args.preset, *args.train_args])
    if not cfg.sft.enabled:
        print(f"sft.enabled is false: every run starts from {cfg.model.name}", flush=True)
        return
    _python(["vineppo.sft", "--preset", args.preset, *args.train_args])


def run_one(args, algo: str, seed: int) -> str:
    run_dir = os.path.join(args.out, f"{algo}-seed{seed}")
    if os.path.isfile(os.path.join(run_dir, DONE_FILE)):
        print(f"{run_dir}: finished earlier, kept", flush=True)
        return run_dir
    train = ["vineppo.train", "--preset", args.preset, "--algo", algo, "--seed", str(seed),
             "--run.run_dir", run_dir, "--ppo.num_iterations", str(args.iterations),
             "--run.max_minutes", "0", "--run.max_train_minutes", str(args.train_minutes),
             "--eval.every", str(args.eval_every), "--run.progress", "false", "--run.keep_checkpoints", "1",
             *args.train_args]
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        train += ["--resume", run_dir]
    start = time.time()
    _python(train)
    with open(os.path.join(run_dir, DONE_FILE), "w") as f:
        json.dump({"algo": algo, "seed": seed, "seconds": time.time() - start}, f)
    return run_dir


def summarize(run_dirs: list[str]) -> list[dict]:
    from vineppo.metrics import ACCURACY_KEY, read_metrics

    rows = []
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        evals = [(m["iteration"], m[ACCURACY_KEY]) for m in records if m.get(ACCURACY_KEY) is not None]
        train = [m for m in records if "reward/mean" in m]
        with open(os.path.join(run_dir, DONE_FILE)) as f:
            done = json.load(f)
        rows.append({
            "run_dir": run_dir, "algo": done["algo"], "seed": done["seed"],
            "iterations": train[-1]["iteration"] if train else 0,
            "train_seconds": train[-1]["wall_clock_s"] if train else 0.0,
            "start_accuracy": evals[0][1] if evals else None,
            "final_accuracy": evals[-1][1] if evals else None,
            "peak_accuracy": max(a for _, a in evals) if evals else None,
            "episodes": train[-1]["episodes"] if train else 0,
            "generated_tokens": sum(m.get("tokens/generated", 0) + m.get("tokens/mc", 0) for m in train),
        })
    return rows


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    ensure_sft(args)
    run_dirs = [run_one(args, algo, seed) for algo in args.algos for seed in args.seeds]
    rows = summarize(run_dirs)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot = [sys.executable, "-m", "vineppo.plot", *run_dirs, "--group-by-seed", "--table",
            *(["--reference", "ppo"] if "ppo" in args.algos else []), "--out", os.path.join(args.out, "curves.png")]
    print("$", " ".join(plot), flush=True)
    table = subprocess.run(plot, check=True, stdout=subprocess.PIPE, text=True).stdout
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    for r in rows:
        print(f"{r['algo']:>8} seed {r['seed']}: {r['iterations']} iterations in {r['train_seconds']:.0f}s, "
              f"test {r['start_accuracy']:.3f} -> final {r['final_accuracy']:.3f} (peak {r['peak_accuracy']:.3f})")


if __name__ == "__main__":
    main()
