"""VinePPO against PPO, GRPO and RLOO: learning curves over seeds, on equal footing.

    python bench/compare_algos.py --time [--algos ...] [--time-iterations 2] --out runs/compare
        # on a machine with nothing else running: seconds per iteration of each algorithm,
        # written to <out>/timings.json
    python bench/compare_algos.py [--preset tiny] [--algos vineppo,ppo,grpo,rloo] [--seeds 0,1,2]
                                  (--iterations N | --timings <out>/timings.json --wall-seconds W)
                                  [--out runs/compare] [-- TRAIN OPTIONS ...]

Every (algo, seed) run starts from the same SFT checkpoint (trained once, up front, outside every
budget) and sees the same number of episodes per iteration (the preset's rollout.num_prompts x
rollout.num_samples). Budgets are iteration counts (`run.max_iterations`), so every metric is
seeded and does not depend on the machine or its load. Equal wall-clock comes from timings taken
alone (`--time`): with `--timings` and `--wall-seconds W`, an algorithm whose iteration costs s
seconds gets floor(W / s) iterations. `--train-minutes` (a load-dependent wall-clock budget,
`run.max_train_minutes`) stays available and is off by default. The learning-rate schedule is
laid out over `--schedule-iterations` for every algorithm, longer than any run, so all of them
train at the same learning rate per iteration.

Each run gets its own folder `<out>/<algo>-seed<seed>`; a finished run is kept and skipped when
the command is repeated, an interrupted one resumes from its last checkpoint. Then:
`<out>/curves.png` and `<out>/table.md` from `python -m vineppo.plot` (against iterations and the
run's own training time); `<out>/curves_equal_time.png`: test accuracy against the quiet-timed
training seconds (iteration x seconds per iteration), mean and min-max band over seeds;
`<out>/summary.json`: per-run numbers and, per algorithm, start / final / peak accuracy (mean,
min, max over seeds) and the seconds per iteration used.
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
    p.add_argument("--iterations", type=int, default=0, help="iterations of every run (0: from --timings)")
    p.add_argument("--timings", default=None, help="timings.json from --time (seconds per iteration)")
    p.add_argument("--wall-seconds", type=float, default=0.0,
                   help="with --timings: equal training wall-clock of every algorithm")
    p.add_argument("--train-minutes", type=float, default=0.0,
                   help="load-dependent training-time cap of every run (0 = none)")
    p.add_argument("--schedule-iterations", type=int, default=400,
                   help="length of the learning-rate schedule (more than any run reaches)")
    p.add_argument("--time", action="store_true", help="only time --time-iterations of each algorithm")
    p.add_argument("--time-iterations", type=int, default=2)
    p.add_argument("--habits", type=int, default=0, metavar="N",
                   help="after the runs: carry-line habits of the SFT start and every final policy on "
                        "the first N test problems (synthetic carry-line task), to <out>/habits.json")
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
    if not args.time and not args.iterations and not (args.timings and args.wall_seconds > 0):
        p.error("give --iterations N, or --timings FILE with --wall-seconds W, or --time")
    return args


def read_timings(path: str) -> dict[str, float]:
    with open(path) as f:
        return {a: float(v["seconds_per_iteration"]) for a, v in json.load(f)["algos"].items()}


def iterations_for(args, algo: str, timings: dict[str, float] | None = None) -> int:
    """Iterations of `algo`: --iterations, or floor(wall-seconds / its seconds per iteration)."""
    if args.iterations:
        return args.iterations
    timings = read_timings(args.timings) if timings is None else timings
    if algo not in timings:
        raise SystemExit(f"{args.timings} has no timing for {algo}; run --time with it first")
    return max(1, int(args.wall_seconds // timings[algo]))


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


def run_one(args, algo: str, seed: int, iterations: int | None = None) -> str:
    run_dir = os.path.join(args.out, f"{algo}-seed{seed}")
    if os.path.isfile(os.path.join(run_dir, DONE_FILE)):
        print(f"{run_dir}: finished earlier, kept", flush=True)
        return run_dir
    iterations = iterations_for(args, algo) if iterations is None else iterations
    train = ["vineppo.train", "--preset", args.preset, "--algo", algo, "--seed", str(seed),
             "--run.run_dir", run_dir, "--ppo.num_iterations", str(args.schedule_iterations),
             "--run.max_iterations", str(iterations),
             "--run.max_minutes", "0", "--run.max_train_minutes", str(args.train_minutes),
             "--eval.every", str(args.eval_every), "--run.progress", "false", "--run.keep_checkpoints", "1",
             *args.train_args]
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        train += ["--resume", run_dir]
    start = time.time()
    _python(train)
    with open(os.path.join(run_dir, DONE_FILE), "w") as f:
        json.dump({"algo": algo, "seed": seed, "iterations": iterations, "seconds": time.time() - start}, f)
    return run_dir


def time_algos(args) -> dict:
    """Seconds per iteration of each algorithm from the shared SFT start (no evaluation): the
    mean `time/iteration` over the iterations after the first (the first also warms up)."""
    from vineppo.metrics import read_metrics

    out = {"command": " ".join(sys.argv), "time_iterations": args.time_iterations, "algos": {}}
    for algo in args.algos:
        run_dir = os.path.join(args.out, "timing", algo)
        if os.path.isdir(run_dir):
            import shutil
            shutil.rmtree(run_dir)
        _python(["vineppo.train", "--preset", args.preset, "--algo", algo, "--seed", "0",
                 "--run.run_dir", run_dir, "--ppo.num_iterations", str(args.schedule_iterations),
                 "--run.max_iterations", str(args.time_iterations), "--run.max_minutes", "0",
                 "--eval.at_start", "false", "--eval.every", str(10 ** 6), "--eval.limit", "1",
                 "--run.progress", "false", "--run.keep_checkpoints", "1", *args.train_args])
        times = [m["time/iteration"] for m in read_metrics(run_dir) if "time/iteration" in m]
        later = times[1:] or times
        out["algos"][algo] = {"iteration_seconds": times, "seconds_per_iteration": sum(later) / len(later)}
        print(f"{algo}: {times} s per iteration", flush=True)
    with open(os.path.join(args.out, "timings.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


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
            "evals": evals,
        })
    return rows


def aggregate(rows: list[dict], timings: dict[str, float] | None = None) -> dict:
    """Per algorithm: start / final / peak test accuracy over seeds (mean, min, max), the peak of
    the seed-mean curve and where it is, and the quiet seconds per iteration (when timed)."""
    out = {}
    for algo in dict.fromkeys(r["algo"] for r in rows):
        runs = [r for r in rows if r["algo"] == algo]
        entry = {"seeds": [r["seed"] for r in runs], "iterations": [r["iterations"] for r in runs]}
        for key in ("start_accuracy", "final_accuracy", "peak_accuracy"):
            vals = [r[key] for r in runs if r[key] is not None]
            if vals:
                entry[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "seeds": vals}
        curves = [dict(r["evals"]) for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        mean_curve = [(i, sum(c[i] for c in curves) / len(curves)) for i in common]
        entry["mean_curve"] = mean_curve
        if mean_curve:
            it, acc = max(mean_curve, key=lambda x: x[1])
            entry["mean_curve_peak"] = {"iteration": it, "accuracy": acc}
        if timings and algo in timings:
            entry["seconds_per_iteration"] = timings[algo]
        out[algo] = entry
    return out


def plot_equal_time(per_algo: dict, path: str) -> None:
    """Test accuracy against quiet-timed training seconds, seed mean with min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algo, e in per_algo.items():
        if not e.get("mean_curve"):
            continue
        its = [i for i, _ in e["mean_curve"]]
        mean = [a for _, a in e["mean_curve"]]
        lo = [e["_band"][i][0] for i in its] if "_band" in e else mean
        hi = [e["_band"][i][1] for i in its] if "_band" in e else mean
        for ax, scale in zip(axes, (1.0, e.get("seconds_per_iteration"))):
            if scale is None:
                continue
            xs = [i * scale for i in its]
            ax.plot(xs, mean, marker="o", label=algo)
            ax.fill_between(xs, lo, hi, alpha=0.2)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training seconds (iterations x quiet seconds per iteration)")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HABIT_KEYS = ("carry_steps", "lined", "slip_lined", "slip_unlined", "other_errors", "needless_lines")


def habits(model: str, limit: int = 200, n: int = 2, max_tokens: int = 160, seed: int = 0) -> dict:
    """How a saved synthetic policy handles carry steps on the first `limit` test problems (`n`
    samples each, the evaluation's T=0.35, top-p 0.9): the share of carry steps written after a
    carry line, the slip rate with and without it, other wrong steps per response, format errors,
    and accuracy (`vineppo.tasks.synthetic.response_habits`)."""
    from vineppo.engine import SamplingParams
    from vineppo.evaluate import load_for_evaluation
    from vineppo.rollout import decode_response, per_prompt_params, score
    from vineppo.tasks import prompt_ids
    from vineppo.tasks.synthetic import response_habits

    run = load_for_evaluation(model, None, None, None, [], device="cpu")
    examples = run.task.test[:limit]
    prompts = [prompt_ids(run.task, ex, run.tokenizer, run.template) for ex in examples]
    params = per_prompt_params(SamplingParams(temperature=0.35, top_p=0.9, max_tokens=max_tokens, n=n,
                                              seed=seed), len(prompts), 0)
    totals = dict.fromkeys(HABIT_KEYS, 0)
    responses = format_errors = right = 0
    for ex, group in zip(examples, run.engine.generate(prompts, params)):
        for c in group:
            text = decode_response(run.tokenizer, c.token_ids)
            h = response_habits(ex.question, text)
            for k in HABIT_KEYS:
                totals[k] += h[k]
            format_errors += h["format_error"]
            right += score(run.task, text, ex, c.finish_reason)
            responses += 1
    unlined = totals["carry_steps"] - totals["lined"]
    return {"model": model, "responses": responses, "accuracy": right / responses, **totals,
            "carry_line_rate": totals["lined"] / max(1, totals["carry_steps"]),
            "slip_rate_lined": totals["slip_lined"] / max(1, totals["lined"]),
            "slip_rate_unlined": totals["slip_unlined"] / max(1, unlined),
            "other_errors_per_response": totals["other_errors"] / responses,
            "format_error_rate": format_errors / responses}


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    ensure_sft(args)
    if args.time:
        time_algos(args)
        return
    timings = read_timings(args.timings) if args.timings else None
    run_dirs = [run_one(args, algo, seed, iterations_for(args, algo, timings))
                for algo in args.algos for seed in args.seeds]
    rows = summarize(run_dirs)
    per_algo = aggregate(rows, timings)
    for algo, e in per_algo.items():
        curves = [dict(r["evals"]) for r in rows if r["algo"] == algo]
        e["_band"] = {i: (min(c[i] for c in curves), max(c[i] for c in curves)) for i, _ in e["mean_curve"]}
    plot_equal_time(per_algo, os.path.join(args.out, "curves_equal_time.png"))
    for e in per_algo.values():
        e.pop("_band", None)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "wall_seconds": args.wall_seconds or None,
                   "algos": per_algo, "runs": rows}, f, indent=2)
    plot = [sys.executable, "-m", "vineppo.plot", *run_dirs, "--group-by-seed", "--table",
            *(["--reference", "ppo"] if "ppo" in args.algos else []), "--out", os.path.join(args.out, "curves.png")]
    print("$", " ".join(plot), flush=True)
    table = subprocess.run(plot, check=True, stdout=subprocess.PIPE, text=True).stdout
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    if args.habits:
        from vineppo.config import load_config
        from vineppo.sft import cache_dir_of, job_from_train_config
        cfg = load_config(["--preset", args.preset, *args.train_args])
        models = {"sft": job_from_train_config(cfg).checkpoint_dir(cache_dir_of(cfg))}
        for r in rows:
            models[f"{r['algo']}-seed{r['seed']}"] = os.path.join(r["run_dir"], "policy")
        found = {name: habits(path, limit=args.habits) for name, path in models.items()}
        with open(os.path.join(args.out, "habits.json"), "w") as f:
            json.dump(found, f, indent=2)
        for name, h in found.items():
            print(f"{name:>16}: accuracy {h['accuracy']:.3f}, carry lines at {h['carry_line_rate']:.2f} of "
                  f"{h['carry_steps']} carry steps, slips {h['slip_rate_lined']:.2f} with / "
                  f"{h['slip_rate_unlined']:.2f} without, other errors {h['other_errors_per_response']:.2f} "
                  f"per response, format errors {h['format_error_rate']:.2f}")
    for r in rows:
        print(f"{r['algo']:>8} seed {r['seed']}: {r['iterations']} iterations, "
              f"test {r['start_accuracy']:.3f} -> final {r['final_accuracy']:.3f} (peak {r['peak_accuracy']:.3f})")


if __name__ == "__main__":
    main()
