"""Training configuration: one dataclass, YAML presets, and a command line that overrides any field.

`TrainConfig` nests the package's own config dataclasses, one per concern, each defined beside
the code that reads it: model (`vineppo.models`), sft (`vineppo.sft`), task, rollout
(`vineppo.rollout`), advantage (`vineppo.algos`), ppo (`vineppo.learner`), engine
(`vineppo.engine`), eval (`vineppo.evaluate`), dist (`vineppo.distributed`), run
(`vineppo.trainer`). Every field carries its help and allowed values (`vineppo.settings.setting`);
`--help` prints them all, and `validate` checks every value, and the settings that depend on each
other, before any work starts. Values come, in order of precedence, from the command line
(``--section.field value``), a ``--config FILE.yaml``, a ``--preset NAME`` (a YAML file in the
repository's ``configs/`` folder; default ``tiny``), and the dataclass defaults (the paper's
settings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vineppo.algos import ALGOS, AdvantageConfig, estimator
from vineppo.distributed import DistConfig
from vineppo.engine import EngineConfig
from vineppo.evaluate import EvalConfig
from vineppo.learner import PPOConfig
from vineppo.metrics import LogConfig
from vineppo.models import ModelConfig
from vineppo.rollout import RolloutConfig
from vineppo.settings import allowed, base_type, check_settings, coerce, setting, type_name
from vineppo.sft import SFTConfig
from vineppo.tasks import TaskConfig
from vineppo.trainer import RunConfig

DEFAULT_PRESET = "tiny"


@dataclass
class TrainConfig:
    algo: str = setting("vineppo", "advantage estimator: vineppo | ppo | grpo | rloo", choices=ALGOS)
    seed: int = setting(0, "seed of data order, sampling and initialisation")
    preset: str = setting(DEFAULT_PRESET, "preset this config started from (a YAML file in configs/)")
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "TrainConfig":
        """Every field's allowed values, then the settings that depend on each other; ValueError
        naming the flag otherwise."""
        check_settings(self, prefix="--")
        self.task.check("--task.")
        self.log.check("--log.")
        r, p = self.rollout, self.ppo
        if estimator(self.algo).needs_groups and r.num_samples < 2:
            raise ValueError(f"--algo {self.algo} needs --rollout.num_samples >= 2, got {r.num_samples}")
        episodes = r.num_prompts * r.num_samples
        if episodes % p.minibatch_size:
            raise ValueError(f"--ppo.minibatch_size ({p.minibatch_size}) must divide the episodes per iteration "
                             f"(--rollout.num_prompts * --rollout.num_samples = {episodes})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, run_dir: str | os.PathLike) -> None:
        """Writes config.yaml and config.json into `run_dir`."""
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
            setattr(obj, key, coerce(value, hints[key], prefix + key, source))


# ---------------------------------------------------------------------------------------------
# typed values

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
        lines.append(f"  --{name} ({type_name(tp)}, default {default!r})")
        rule = allowed(f)
        lines.append(f"      {f.metadata.get('help', '')}" + (f" ({rule})" if rule else ""))
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


def command_line_fields(argv: list[str]) -> set[str]:
    """The dotted field names an argument list sets (``run.max_iterations`` for
    ``--max-iterations 5``), plus "preset" and "config" when given."""
    return {key[2:] for key, _ in _split_argv(argv)}


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
            if base_type(tp)[0] is not bool:
                raise ValueError(f"{key} needs a value")
            value = "true"
        setattr(owner, f.name, coerce(value, tp, name, "command line"))
    return cfg.validate() if validate else cfg
