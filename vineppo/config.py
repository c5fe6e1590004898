"""Training configuration: one dataclass, YAML presets, and a command line that overrides any field.

`TrainConfig` nests one dataclass per concern (model, sft, task, rollout, ppo, engine, eval, dist,
run). Every field carries a help string in its metadata; `--help` prints them all. Values come,
in order of precedence, from the command line (``--section.field value``), a ``--config FILE.yaml``,
a ``--preset NAME`` (a YAML file in the repository's ``configs/`` folder; default ``tiny``), and
the dataclass defaults (the paper's settings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ALGOS = ("vineppo", "ppo", "grpo", "rloo")
DEFAULT_PRESET = "tiny"


def _f(default, help: str, **kw):
    """A dataclass field with a help string (mutable defaults go through default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f("tiny", "policy to train: 'tiny' (the tiny Llama, warm-started by SFT on the task), "
                   "'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), a save_pretrained folder, "
                   "a .gguf file, or a hub name")
    gguf_file: str = _f("", "GGUF file name inside `name` when `name` is a folder or hub repo")
    dtype: str = _f("auto", "engine / compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
                    "bfloat16, float16; trainable weights stay float32")


@dataclass
class SFTConfig:
    enabled: bool = _f(True, "with model.name=tiny: run SFT first when no checkpoint for these settings exists")
    output_dir: str = _f("", "where SFT checkpoints live (default: <run.output_dir>/sft)")
    epochs: float = _f(1.0, "passes over the SFT data (may be fractional)")
    num_examples: int = _f(0, "SFT examples from the train split (0 = all)")
    batch_size: int = _f(32, "sequences per optimizer step")
    lr: float = _f(3e-3, "AdamW peak learning rate (cosine decay)")
    warmup_ratio: float = _f(0.03, "fraction of SFT steps spent warming the learning rate up")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_minutes: float = _f(0.0, "wall-clock cap on SFT (0 = none)")
    seed: int = _f(0, "seed of SFT initialisation and data order (independent of the RL --seed, so "
                   "runs with different seeds start from the same SFT checkpoint)")


@dataclass
class TaskConfig:
    name: str = _f("synthetic", "task: synthetic | gsm8k | math")
    path: str = _f("", "local data folder/file or hub dataset name (gsm8k / math); empty = the task's default")
    on_error: str = _f("raise", "gsm8k / math: a malformed data row stops loading with its file and line "
                       "('raise') or is skipped and counted ('skip')")
    seed: int = _f(0, "synthetic: seed of the generated train/test problems (independent of the RL "
                   "--seed, so runs with different seeds are scored on the same test set)")
    num_steps: int = _f(3, "synthetic: arithmetic steps per problem (the most)")
    min_steps: int = _f(0, "synthetic: the fewest steps per problem (0 = num_steps - 1)")
    max_operand: int = _f(9, "synthetic: largest start value and +/- operand")
    max_multiplier: int = _f(1, "synthetic: '* k' steps with k up to this (< 2 = no multiplication)")
    max_value: int = _f(30, "synthetic: every intermediate value stays in [0, max_value]")
    carry_slip: float = _f(0.0, "synthetic: probability that a train demonstration (SFT target) forgets "
                           "a carry/borrow; answers and rewards stay exact")
    early_answer: float = _f(0.0, "synthetic: probability that a train demonstration (SFT target) writes "
                             "its answer one operation before the end; answers and rewards stay exact")
    num_train: int = _f(20000, "synthetic: train problems generated")
    num_test: int = _f(500, "synthetic: test problems generated")
    max_train: int = _f(0, "use at most this many train problems (0 = all)")


@dataclass
class RolloutConfig:
    num_prompts: int = _f(64, "prompts per iteration (all ranks together)")
    num_samples: int = _f(8, "trajectories per prompt (N)")
    mc_rollouts: int = _f(9, "VinePPO: Monte Carlo continuations per step boundary (K)")
    max_steps: int = _f(25, "VinePPO: at most this many estimated states per trajectory")
    temperature: float = _f(0.6, "sampling temperature (also divides the training logits)")
    top_p: float = _f(0.9, "nucleus sampling threshold")
    max_tokens: int = _f(1024, "max new tokens per response")
    template: str = _f("plain", "prompt template: plain | chat")


@dataclass
class PPOConfig:
    num_iterations: int = _f(1000, "training iterations (sets the learning-rate schedule's length)")
    epochs: int = _f(2, "passes over each iteration's episodes")
    minibatch_size: int = _f(64, "episodes per optimizer step (all ranks together)")
    micro_batch_size: int = _f(8, "episodes per forward/backward pass on one rank (gradient accumulation)")
    lr: float = _f(1e-6, "AdamW peak learning rate of the policy")
    warmup_ratio: float = _f(0.03, "fraction of optimizer steps with linear warmup (then linear decay to 0)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "max global gradient norm (0 = off)")
    clip_range: float = _f(0.2, "PPO ratio clip epsilon")
    kl_coef: float = _f(1e-4, "coefficient of the k3 KL to the reference model in the loss (0 = no reference model)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    whiten_advantages: bool = _f(True, "whiten advantages over the iteration's episodes")
    gamma: float = _f(1.0, "discount (VinePPO and GAE)")
    lam: float = _f(1.0, "GAE lambda (ppo)")
    value_lr: float = _f(1e-6, "ppo: AdamW learning rate of the value network")
    value_coef: float = _f(1.0, "ppo: value loss weight")
    value_clip_range: float = _f(0.2, "ppo: clip range of the value loss")


@dataclass
class EngineConfig:
    page_size: int = _f(16, "tokens per KV page")
    num_pages: int = _f(0, "KV pages per engine (0 = from memory_fraction)")
    memory_fraction: float = _f(0.5, "fraction of free device memory for the KV cache")
    max_num_seqs: int = _f(256, "max sequences per engine step")
    max_num_batched_tokens: int = _f(2048, "max tokens per engine step (chunked prefill)")
    tree_decode: str = _f("auto", "prefix-shared decode: auto | always | never")
    use_cuda_graphs: bool = _f(True, "capture decode steps in CUDA graphs (GPU)")


@dataclass
class EvalConfig:
    every: int = _f(10, "evaluate on the test split every this many iterations (0 = only at the end)")
    at_start: bool = _f(True, "evaluate before the first iteration")
    n: int = _f(16, "samples per test problem")
    temperature: float = _f(0.35, "sampling temperature")
    top_p: float = _f(0.9, "nucleus sampling threshold")
    max_tokens: int = _f(0, "max new tokens (0 = rollout.max_tokens)")
    limit: int = _f(0, "evaluate on the first this many test problems (0 = all)")


@dataclass
class DistConfig:
    mixed_precision: str = _f("auto", "FSDP2 param/compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    activation_checkpointing: str = _f("auto", "auto (on for GPU), on, off")
    reshard_after_forward: bool = _f(True, "FSDP2: free gathered parameters after each layer's forward")


@dataclass
class RunConfig:
    name: str = _f("", "run name (default: <preset>-<algo>); the folder is <output_dir>/<name>-<timestamp>")
    output_dir: str = _f("runs", "parent folder of run folders")
    run_dir: str = _f("", "exact run folder (overrides name/output_dir/timestamp)")
    resume: str = _f("", "run folder to continue from its latest checkpoint")
    max_iterations: int = _f(0, "stop after this many iterations in total (0 = ppo.num_iterations)")
    max_minutes: float = _f(0.0, "stop when this many minutes of wall clock have passed (0 = no limit)")
    max_train_minutes: float = _f(0.0, "stop when this many minutes of training (iterations only, without "
                                  "evaluation and checkpoints: the metrics' wall_clock_s) have passed; "
                                  "equal budgets for comparing algorithms (0 = no limit)")
    save_every: int = _f(1, "checkpoint every this many iterations (also at the end; 0 = only at the end); "
                         "a killed run loses the iterations since its last checkpoint")
    keep_checkpoints: int = _f(2, "keep this many latest checkpoints")
    max_nan_skips: int = _f(10, "stop after this many skipped updates with a non-finite loss")
    num_logged_samples: int = _f(4, "episodes per iteration written to samples.jsonl")
    tensorboard: bool = _f(True, "also write TensorBoard event files")
    progress: bool = _f(True, "show progress bars")
    device: str = _f("", "device (default: cuda when available, else cpu)")
    threads: int = _f(0, "torch CPU threads (0 = torch's default)")


@dataclass
class TrainConfig:
    algo: str = _f("vineppo", "advantage estimator: vineppo | ppo | grpo | rloo")
    seed: int = _f(0, "seed of data order, sampling and initialisation")
    preset: str = _f(DEFAULT_PRESET, "preset this config started from (a YAML file in configs/)")
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "TrainConfig":
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        r, p = self.rollout, self.ppo
        for name, value in [("rollout.num_prompts", r.num_prompts), ("rollout.num_samples", r.num_samples),
                            ("rollout.max_tokens", r.max_tokens), ("ppo.epochs", p.epochs),
                            ("ppo.minibatch_size", p.minibatch_size), ("ppo.micro_batch_size", p.micro_batch_size),
                            ("ppo.num_iterations", p.num_iterations), ("eval.n", self.eval.n)]:
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.algo == "vineppo" and r.mc_rollouts <= 0:
            raise ValueError(f"rollout.mc_rollouts must be positive for vineppo, got {r.mc_rollouts}")
        if self.algo in ("grpo", "rloo") and r.num_samples < 2:
            raise ValueError(f"{self.algo} needs rollout.num_samples >= 2, got {r.num_samples}")
        if r.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 (training logits are divided by it), got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
        episodes = r.num_prompts * r.num_samples
        if episodes % p.minibatch_size:
            raise ValueError(f"ppo.minibatch_size ({p.minibatch_size}) must divide the episodes per iteration "
                             f"(rollout.num_prompts * rollout.num_samples = {episodes})")
        if not 0 <= p.warmup_ratio < 1:
            raise ValueError(f"ppo.warmup_ratio must be in [0, 1), got {p.warmup_ratio}")
        if self.run.keep_checkpoints < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1, got {self.run.keep_checkpoints}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, run_dir: str | os.PathLike) -> None:
        """Writes config.yaml and config.json into `run_dir`."""
        import yaml

        data = self.to_dict()
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(data, f, indent=2)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        cfg = cls()
        _apply_dict(cfg, data, source="dict")
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """Reads a config.json / config.yaml written by `save` (or any YAML in the same shape)."""
        return cls.from_dict(_read_yaml(path))


# ---------------------------------------------------------------------------------------------
# presets and YAML

def configs_dir() -> Path:
    """The repository's configs/ folder (beside the vineppo package)."""
    path = Path(__file__).resolve().parent.parent / "configs"
    if not path.is_dir():
        raise FileNotFoundError(f"presets folder {path} not found: vineppo must run from its repository "
                                f"(or pass --config FILE.yaml)")
    return path


def list_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = configs_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def _read_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    with open(path) as f:
        data = yaml.safe_load(f) if path.suffix != ".json" else json.load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _apply_dict(obj, data: dict, source: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{source}: unknown config field {prefix + key!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {prefix + key} must be a mapping, got {value!r}")
            _apply_dict(current, value, source, prefix + key + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], prefix + key, source))


# ---------------------------------------------------------------------------------------------
# typed values

def _base_type(tp):
    """(type, optional) for `T` or `T | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _type_name(tp) -> str:
    tp, optional = _base_type(tp)
    if typing.get_origin(tp) is list:
        name = f"list[{typing.get_args(tp)[0].__name__}]"
    else:
        name = tp.__name__
    return name + (" | None" if optional else "")


def _coerce(value, tp, name: str, source: str):
    """Converts `value` (a YAML value or a command-line string) to the field type `tp`."""
    tp, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{source}: {name} cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError("expected an integer")
                return int(value)
            return int(str(value).strip().replace("_", ""))
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            return str(value)
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            if isinstance(value, str):
                import yaml

                text = value.strip()
                value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(v.strip() if isinstance(v, str) else v, item, name, source) for v in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: bad value {value!r} for {name} ({_type_name(tp)}): {exc}") from None
    raise ValueError(f"{source}: unsupported field type {tp} for {name}")


# ---------------------------------------------------------------------------------------------
# command line

ALIASES = {"--resume": "--run.resume", "--run-dir": "--run.run_dir", "--max-iterations": "--run.max_iterations",
           "--max-minutes": "--run.max_minutes"}


def _leaf_fields(obj, prefix: str = ""):
    """(dotted name, owner, field, type) for every non-dataclass field, in declaration order."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, obj, f, hints[f.name]


def format_help(cfg: TrainConfig | None = None) -> str:
    cfg = cfg or TrainConfig()
    try:
        presets = ", ".join(list_presets())
    except FileNotFoundError:
        presets = "(configs/ folder not found)"
    lines = [
        "usage: python -m vineppo.train [--preset NAME] [--config FILE.yaml] [--section.field VALUE ...]",
        "       torchrun --nproc_per_node=N -m vineppo.train [...]",
        "",
        "Trains a policy with VinePPO (or the PPO / GRPO / RLOO baselines) and writes a run folder.",
        "",
        f"  --preset NAME        start from configs/NAME.yaml (default {DEFAULT_PRESET}); presets: {presets}",
        "  --config FILE.yaml   apply a YAML file (same shape as a run's config.yaml) after the preset",
        "  --resume RUN_DIR     continue a run from its latest checkpoint (alias of --run.resume)",
        "  -h, --help           show this help (defaults shown are the chosen preset's)",
        "",
        "Every field below can be set with --name VALUE or --name=VALUE; booleans also as a bare --name;",
        "lists as a,b,c or [a, b, c].",
    ]
    section = None
    for name, owner, f, tp in _leaf_fields(cfg):
        head = name.split(".")[0] if "." in name else ""
        if head != section:
            section = head
            lines += ["", f"[{head}]" if head else "[top level]"]
        default = getattr(owner, f.name)
        lines.append(f"  --{name} ({_type_name(tp)}, default {default!r})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


def _split_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """[(--name, value or None)] with `--name=value`, `--name value` and bare boolean `--name`."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}; options look like --section.field VALUE (see --help)")
        if "=" in arg:
            key, value = arg.split("=", 1)
            pairs.append((key, value))
            i += 1
        elif i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2
                                        and not argv[i + 1][2].isdigit()):
            pairs.append((arg, argv[i + 1]))
            i += 2
        else:
            pairs.append((arg, None))
            i += 1
    return [(ALIASES.get(k, k), v) for k, v in pairs]


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from command-line arguments (see `format_help`); prints help and exits on -h/--help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        rest = [a for a in argv if a not in ("-h", "--help")]
        try:
            cfg = _build(rest, validate=False)
        except ValueError:
            cfg = TrainConfig()
        sys.stdout.write(format_help(cfg))
        raise SystemExit(0)
    return _build(argv, validate=True)


def _build(argv: list[str], validate: bool) -> TrainConfig:
    pairs = _split_argv(argv)
    preset = DEFAULT_PRESET
    config_files = []
    overrides = []
    for key, value in pairs:
        if key == "--preset":
            if not value:
                raise ValueError("--preset needs a name")
            preset = value
        elif key == "--config":
            if not value:
                raise ValueError("--config needs a file")
            config_files.append(value)
        else:
            overrides.append((key, value))
    cfg = TrainConfig()
    _apply_dict(cfg, _read_yaml(preset_path(preset)), source=f"preset {preset}")
    cfg.preset = preset
    for path in config_files:
        _apply_dict(cfg, _read_yaml(path), source=str(path))
    fields = {name: (owner, f, tp) for name, owner, f, tp in _leaf_fields(cfg)}
    for key, value in overrides:
        name = key[2:]
        if name not in fields:
            close = [n for n in fields if n.endswith("." + name) or n.split(".")[-1] == name.split(".")[-1]]
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown option {key}{hint}; see --help")
        owner, f, tp = fields[name]
        if value is None:
            if _base_type(tp)[0] is not bool:
                raise ValueError(f"{key} needs a value")
            value = "true"
        setattr(owner, f.name, _coerce(value, tp, name, "command line"))
    return cfg.validate() if validate else cfg


def rollout_kwargs(cfg: TrainConfig, seed: int) -> dict:
    """Keyword arguments of vineppo.rollout.RolloutConfig for one iteration (`seed` varies per iteration)."""
    r = cfg.rollout
    return dict(num_samples=r.num_samples, mc_rollouts=r.mc_rollouts, max_steps=r.max_steps,
                temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=seed,
                template=r.template)
