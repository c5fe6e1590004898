"""Learning curves of one or more runs, and the summary table of a comparison.

    python -m vineppo.plot RUN_DIR [RUN_DIR ...] [--out PNG] [--group-by-seed] [--band minmax|std]
                           [--table] [--target-accuracy X | --reference LABEL]

Reads each run folder's ``metrics.jsonl`` (names from ``vineppo.metrics.METRICS_SCHEMA``) and
``config.json``, and draws test accuracy and training reward against iterations and against
wall-clock time, one line per run. With ``--group-by-seed``, runs whose configs are equal except
for seeds and output paths are one line: the mean over seeds with a shaded band (min-max or
+-1 std). ``--table`` prints a markdown table: peak accuracy, and the iterations, wall-clock
and gradient steps needed to reach a target accuracy (a number, or the peak of a reference group
such as ``--reference ppo``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from vineppo.metrics import ACCURACY_KEY, REWARD_KEY, read_metrics

CONFIG_FILE = "config.json"
GRAD_STEPS_KEY = "train/grad_steps"
# config keys that differ between seeds of one experiment without changing the experiment
IGNORED_CONFIG_KEYS = frozenset({"seed", "run_dir", "run_name", "output_dir", "out_dir",
                                 "runs_dir", "run_root", "resume", "run.name"})


@dataclass
class RunData:
    run_dir: str
    records: list[dict]
    config: dict | None = None
    label: str = ""

    def series(self, key: str, x: str = "iteration") -> tuple[np.ndarray, np.ndarray]:
        """(x, value) of the lines holding a non-null ``key``, one point per iteration (the
        last line of an iteration wins), sorted by iteration."""
        by_iter: dict[int, tuple[float, float]] = {}
        for rec in self.records:
            v, xv = rec.get(key), rec.get(x)
            if v is None or xv is None or "iteration" not in rec:
                continue
            by_iter[int(rec["iteration"])] = (float(xv), float(v))
        pts = [by_iter[i] for i in sorted(by_iter)]
        if not pts:
            return np.empty(0), np.empty(0)
        xs, vs = zip(*pts)
        return np.asarray(xs, dtype=float), np.asarray(vs, dtype=float)


@dataclass
class RunGroup:
    label: str
    runs: list[RunData] = field(default_factory=list)


@dataclass
class Curve:
    """Mean over the runs of a group on a common x grid, and the band around it."""
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    num_runs: int


@dataclass
class SummaryRow:
    label: str
    num_runs: int
    peak_accuracy: float | None          # max over iterations of the seed-mean test accuracy
    peak_accuracy_std: float | None      # std over seeds at that iteration
    peak_iteration: float | None
    target_accuracy: float | None
    iterations_to_target: float | None   # first iteration whose seed-mean accuracy >= target
    time_to_target_s: float | None       # mean over seeds of wall_clock_s at that iteration
    grad_steps_to_target: float | None   # mean over seeds of train/grad_steps at that iteration


# ---- loading and grouping --------------------------------------------------------------------

def load_run(run_dir: str) -> RunData:
    config = None
    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    return RunData(run_dir=run_dir, records=read_metrics(run_dir), config=config)


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


def _ignored(key: str, ignore: frozenset[str]) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in ignore or key in ignore or leaf.endswith("_seed")


def _varying_label(configs: list[dict], fallback: list[str]) -> list[str]:
    """Label each config by the keys whose values differ between configs."""
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    leaves = [k.rsplit(".", 1)[-1] for k in varying]
    names = leaves if len(set(leaves)) == len(leaves) else varying
    labels = []
    for c, fb in zip(configs, fallback):
        parts = [f"{name}={c.get(k)}" for name, k in zip(names, varying)]
        labels.append(", ".join(parts) if parts else fb)
    return labels


def group_runs(runs: list[RunData], by_seed: bool = True,
               ignore: frozenset[str] = IGNORED_CONFIG_KEYS) -> list[RunGroup]:
    """Groups of runs; with ``by_seed`` runs whose configs match except ignored keys are one
    group, otherwise every run is its own group. Runs without a config.json are alone."""
    path_keys = frozenset(ignore - {"seed"})
    if not by_seed:
        def keep(k: str, flat: dict) -> bool:
            # label by the run's seed: the top-level one when there is one
            if k.rsplit(".", 1)[-1] == "seed":
                return k == "seed" or "seed" not in flat
            return not _ignored(k, path_keys)
        flats = [_flatten(r.config or {}) for r in runs]
        labels = _varying_label([{k: v for k, v in f.items() if keep(k, f)} for f in flats],
                                [os.path.basename(os.path.normpath(r.run_dir)) for r in runs])
        if len(set(labels)) < len(labels):   # equal configs: tell them apart by folder
            labels = [os.path.basename(os.path.normpath(r.run_dir)) for r in runs]
        groups = []
        for r, label in zip(runs, labels):
            r.label = label
            groups.append(RunGroup(label=label, runs=[r]))
        return groups
    buckets: dict[str, list[RunData]] = {}
    configs: dict[str, dict] = {}
    for r in runs:
        if r.config is None:
            key = "run:" + os.path.abspath(r.run_dir)
            flat = {}
        else:
            flat = {k: v for k, v in _flatten(r.config).items() if not _ignored(k, ignore)}
            key = json.dumps(flat, sort_keys=True)
        buckets.setdefault(key, []).append(r)
        configs[key] = flat
    keys = list(buckets)
    fallback = [os.path.basename(os.path.normpath(buckets[k][0].run_dir)) for k in keys]
    labels = _varying_label([configs[k] for k in keys], fallback)
    groups = []
    for k, label in zip(keys, labels):
        n = len(buckets[k])
        full = f"{label} ({n} seeds)" if n > 1 else label
        for r in buckets[k]:
            r.label = full
        groups.append(RunGroup(label=full, runs=buckets[k]))
    return groups


# ---- aggregation -----------------------------------------------------------------------------

def aggregate(group: RunGroup, key: str, x: str = "iteration", band: str = "minmax") -> Curve | None:
    """Mean and band of ``key`` over the runs of a group, on the x range every run covers
    (runs are linearly interpolated onto the union of their x points). None without data."""
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    series = [r.series(key, x) for r in group.runs]
    series = [(xs, vs) for xs, vs in series if len(xs)]
    if not series:
        return None
    lo = max(float(xs.min()) for xs, _ in series)
    hi = min(float(xs.max()) for xs, _ in series)
    grid = np.unique(np.concatenate([xs for xs, _ in series]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if len(grid) == 0:
        return None
    # wall-clock need not increase strictly with iteration after a resume: sort before np.interp
    ys = []
    for xs, vs in series:
        order = np.argsort(xs, kind="stable")
        ys.append(np.interp(grid, xs[order], vs[order]))
    ys = np.stack(ys)
    mean = ys.mean(axis=0)
    if band == "minmax":
        low, high = ys.min(axis=0), ys.max(axis=0)
    else:
        std = ys.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros_like(mean)
        low, high = mean - std, mean + std
    return Curve(x=grid, mean=mean, low=low, high=high, num_runs=len(ys))


# ---- plotting --------------------------------------------------------------------------------

def plot_groups(groups: list[RunGroup], out: str, band: str = "minmax", title: str | None = None) -> str:
    """Draw the 2 x 2 figure (accuracy / reward against iterations / wall-clock) to ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    max_t = max((float(r.series(REWARD_KEY, "wall_clock_s")[0].max(initial=0.0))
                 for g in groups for r in g.runs), default=0.0)
    t_scale, t_unit = (60.0, "min") if max_t > 600 else (1.0, "s")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    panels = [(ACCURACY_KEY, "test accuracy"), (REWARD_KEY, "train reward")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (key, ylabel) in enumerate(panels):
        for col, (x, xlabel) in enumerate([("iteration", "iteration"),
                                           ("wall_clock_s", f"wall-clock ({t_unit})")]):
            ax = axes[row][col]
            drawn = False
            for gi, g in enumerate(groups):
                c = aggregate(g, key, x, band)
                if c is None:
                    continue
                xs = c.x / t_scale if x == "wall_clock_s" else c.x
                color = colors[gi % len(colors)]
                ax.plot(xs, c.mean, color=color, label=g.label, marker="o" if len(xs) < 30 else None,
                        markersize=3)
                if c.num_runs > 1:
                    ax.fill_between(xs, c.low, c.high, color=color, alpha=0.2, linewidth=0)
                drawn = True
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center",
                        transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_runs(run_dirs: list[str], out: str, group_by_seed: bool = False, band: str = "minmax",
              title: str | None = None) -> str:
    """Load run folders and draw their curves to ``out`` (PNG). Returns ``out``."""
    if not run_dirs:
        raise ValueError("no run folders given")
    runs = [load_run(d) for d in run_dirs]
    return plot_groups(group_runs(runs, by_seed=group_by_seed), out, band, title)


# ---- summary table ---------------------------------------------------------------------------

def _at_iteration(run: RunData, key: str, iteration: float) -> float | None:
    xs, vs = run.series(key, "iteration")
    if len(xs) == 0 or iteration < xs.min() or iteration > xs.max():
        return None
    return float(np.interp(iteration, xs, vs))


def _mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if len(vals) == len(values) and vals else None


def _resolve_reference(groups: list[RunGroup], reference: str) -> RunGroup:
    matches = []
    for g in groups:
        base = g.label.split(" (")[0]
        parts = [p.strip() for p in base.split(",")]
        names = {g.label, base, *parts, *(p.split("=", 1)[-1] for p in parts)}
        if reference in names:
            matches.append(g)
    if len(matches) != 1:
        raise ValueError(f"reference {reference!r} matches {len(matches)} groups; labels: "
                         f"{[g.label for g in groups]}")
    return matches[0]


def summarize_groups(groups: list[RunGroup], target_accuracy: float | None = None,
                     reference: str | None = None) -> list[SummaryRow]:
    """One row per group. The target is ``target_accuracy``, or the peak seed-mean accuracy of
    the ``reference`` group (e.g. PPO's peak), or none."""
    if target_accuracy is not None and reference is not None:
        raise ValueError("give target_accuracy or reference, not both")
    curves = {id(g): aggregate(g, ACCURACY_KEY, "iteration") for g in groups}
    if reference is not None:
        ref_curve = curves[id(_resolve_reference(groups, reference))]
        if ref_curve is None:
            raise ValueError(f"reference group {reference!r} has no '{ACCURACY_KEY}'")
        target_accuracy = float(ref_curve.mean.max())
    rows = []
    for g in groups:
        c = curves[id(g)]
        row = SummaryRow(label=g.label, num_runs=len(g.runs), peak_accuracy=None,
                         peak_accuracy_std=None, peak_iteration=None,
                         target_accuracy=target_accuracy, iterations_to_target=None,
                         time_to_target_s=None, grad_steps_to_target=None)
        if c is not None:
            i = int(np.argmax(c.mean))
            row.peak_accuracy = float(c.mean[i])
            row.peak_iteration = float(c.x[i])
            per_run = [_at_iteration(r, ACCURACY_KEY, c.x[i]) for r in g.runs]
            per_run = [v for v in per_run if v is not None]
            row.peak_accuracy_std = float(np.std(per_run, ddof=1)) if len(per_run) > 1 else 0.0
            if target_accuracy is not None:
                # a small tolerance so that a group reaches its own peak despite float noise
                hit = np.nonzero(c.mean >= target_accuracy - 1e-9)[0]
                if len(hit):
                    it = float(c.x[hit[0]])
                    row.iterations_to_target = it
                    row.time_to_target_s = _mean_or_none(
                        [_at_iteration(r, "wall_clock_s", it) for r in g.runs])
                    row.grad_steps_to_target = _mean_or_none(
                        [_at_iteration(r, GRAD_STEPS_KEY, it) for r in g.runs])
        rows.append(row)
    return rows


def summary_rows(run_dirs: list[str], target_accuracy: float | None = None,
                 reference: str | None = None, group_by_seed: bool = True) -> list[SummaryRow]:
    """Summary rows (peak accuracy; iterations, seconds and gradient steps to reach the target)
    of the given run folders."""
    runs = [load_run(d) for d in run_dirs]
    return summarize_groups(group_runs(runs, by_seed=group_by_seed), target_accuracy, reference)


def format_summary_table(rows: list[SummaryRow]) -> str:
    """Markdown table of summary rows ("-" where a value is missing or the target is unmet)."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    target = next((r.target_accuracy for r in rows if r.target_accuracy is not None), None)
    tgt = f" {target:.3f}" if target is not None else ""
    lines = [f"| run | runs | peak accuracy | peak at iteration | iterations to{tgt} "
             f"| wall-clock to{tgt} (s) | gradient steps to{tgt} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r.peak_accuracy is None else (
            f"{r.peak_accuracy:.3f}" + (f" ± {r.peak_accuracy_std:.3f}" if r.num_runs > 1 else ""))
        lines.append(f"| {r.label} | {r.num_runs} | {peak} | {f(r.peak_iteration, '.0f')} | "
                     f"{f(r.iterations_to_target, '.0f')} | {f(r.time_to_target_s, '.1f')} | "
                     f"{f(r.grad_steps_to_target, '.0f')} |")
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------------------

def _default_out(run_dirs: list[str]) -> str:
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "curves.png")
    return os.path.join(os.path.commonpath([os.path.abspath(d) for d in run_dirs]), "curves.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vineppo.plot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (with metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png, or curves.png in the "
                                 "common parent of several run folders)")
    p.add_argument("--group-by-seed", action="store_true",
                   help="draw runs that differ only by seed as mean and band")
    p.add_argument("--band", choices=("minmax", "std"), default="minmax",
                   help="spread drawn around the seed mean (default: minmax)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--table", action="store_true", help="print the markdown summary table")
    p.add_argument("--target-accuracy", type=float, help="accuracy the table measures time to")
    p.add_argument("--reference", help="group label (e.g. ppo) whose peak accuracy is the target")
    p.add_argument("--ignore-key", action="append", default=[],
                   help="extra config key that does not split seed groups (repeatable)")
    args = p.parse_args(argv)
    for d in args.run_dirs:
        if not os.path.isdir(d):
            p.error(f"not a folder: {d}")
    ignore = IGNORED_CONFIG_KEYS | frozenset(args.ignore_key)
    runs = [load_run(d) for d in args.run_dirs]
    groups = group_runs(runs, by_seed=args.group_by_seed, ignore=ignore)
    out = args.out or _default_out(args.run_dirs)
    plot_groups(groups, out, band=args.band, title=args.title)
    print(f"wrote {out}", file=sys.stderr)     # stdout carries the table alone
    if args.table:
        try:
            rows = summarize_groups(groups, args.target_accuracy, args.reference)
        except ValueError as e:
            p.error(str(e))
        print(format_summary_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
