"""Supervised fine-tuning: the warm start of RL training.

Trains the policy to produce ``task.sft_target(example)`` after ``task.prompt(example)`` (the loss
is on the target tokens and the final eos only), with AdamW and a warmup + cosine schedule, and
saves model and tokenizer with ``save_pretrained``. Prompt and target are tokenised separately and
concatenated, exactly as the engine sees a prompt and then samples a response.

`ensure_sft_checkpoint` keys checkpoints by a hash of every setting that changes the result, so
a second run with the same settings reuses the first one's checkpoint.

    python -m vineppo.sft [--preset tiny] [--sft.epochs 2 ...]   # same options as vineppo.train
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

SETTINGS_FILE = "sft_settings.json"
LOG_FILE = "sft_log.json"
# SyntheticConfig fields, taken from the train config's task section where it has them
SYNTHETIC_KNOBS = ("num_steps", "min_steps", "max_operand", "max_multiplier", "max_value", "carry_slip",
                   "early_answer", "num_train", "num_test")


@dataclass
class SFTSettings:
    """Everything SFT depends on. `key()` hashes all of it except where files go and the device."""

    task: str = "synthetic"
    task_path: str = ""                               # local data for gsm8k / math
    task_knobs: dict = field(default_factory=dict)    # load_task(**knobs), e.g. synthetic num_steps
    task_seed: int = 0                                # synthetic: generator seed of the problems
    model: str = "tiny"                               # "tiny" or anything load_policy accepts
    gguf_file: str = ""
    model_overrides: dict = field(default_factory=dict)  # tiny_model_config overrides
    template: str = "plain"
    epochs: float = 1.0
    num_examples: int = 0                             # train examples used (0 = all)
    batch_size: int = 32
    lr: float = 3e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_minutes: float = 0.0                          # wall-clock cap (0 = none)
    max_length: int = 0                               # truncate examples (0 = model's context)
    seed: int = 0                                     # initialisation and data order
    cache_dir: str = "runs/sft"
    device: str = ""
    progress: bool = True

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"SFT epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"SFT batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"SFT lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"SFT warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_examples < 0 or self.max_minutes < 0 or self.max_length < 0:
            raise ValueError("SFT num_examples, max_minutes and max_length must be >= 0")

    def key(self) -> str:
        data = dataclasses.asdict(self)
        for name in ("cache_dir", "device", "progress"):
            data.pop(name)
        if self.task == "synthetic":  # same knobs, new generator: different data, so a new checkpoint
            from vineppo.tasks.synthetic import GENERATOR_VERSION

            data["synthetic_generator"] = GENERATOR_VERSION
        blob = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def checkpoint_dir(self) -> str:
        return os.path.join(self.cache_dir, f"{self.task}-{self.key()}")


def synthetic_knobs(task_cfg) -> dict:
    """The synthetic task's generator settings from a train config's task section; SFT and RL
    both load the task with these, so they see the same train/test problems."""
    knobs = {k: getattr(task_cfg, k) for k in SYNTHETIC_KNOBS if hasattr(task_cfg, k)}
    if knobs.get("min_steps") == 0:
        knobs["min_steps"] = None      # the config's 0 means "num_steps - 1"
    return knobs


def settings_from_train_config(cfg) -> SFTSettings:
    """SFT settings of a `vineppo.config.TrainConfig`: the same task and model as RL; the seeds
    are the config's ``sft.seed`` and ``task.seed``, never the RL seed."""
    knobs = synthetic_knobs(cfg.task) if cfg.task.name == "synthetic" else {}
    num_examples = cfg.sft.num_examples
    if cfg.task.max_train and (num_examples == 0 or num_examples > cfg.task.max_train):
        num_examples = cfg.task.max_train
    return SFTSettings(
        task=cfg.task.name, task_path=cfg.task.path, task_knobs=knobs, task_seed=cfg.task.seed,
        model=cfg.model.name, gguf_file=cfg.model.gguf_file, template=cfg.rollout.template,
        epochs=cfg.sft.epochs, num_examples=num_examples, batch_size=cfg.sft.batch_size,
        lr=cfg.sft.lr, warmup_ratio=cfg.sft.warmup_ratio, weight_decay=cfg.sft.weight_decay,
        grad_clip=cfg.ppo.grad_clip, max_minutes=cfg.sft.max_minutes, seed=cfg.sft.seed,
        cache_dir=cfg.sft.output_dir or os.path.join(cfg.run.output_dir, "sft"),
        device=cfg.run.device, progress=cfg.run.progress,
    )


def _as_settings(cfg) -> SFTSettings:
    if isinstance(cfg, SFTSettings):
        return cfg
    if hasattr(cfg, "sft") and hasattr(cfg, "task"):
        return settings_from_train_config(cfg)
    raise ValueError(f"expected SFTSettings or TrainConfig, got {type(cfg).__name__}")


def load_sft_task(s: SFTSettings):
    from vineppo.tasks import load_task

    return load_task(s.task, s.task_path or None, seed=s.task_seed, **s.task_knobs)


def init_policy(s: SFTSettings, device):
    """(model, tokenizer) before SFT: the tiny Llama with the synthetic tokenizer, or a loaded model."""
    from vineppo.models import build_model_from_config, load_policy, tiny_model_config

    if s.model == "tiny":
        from vineppo.tasks import build_synthetic_tokenizer

        tokenizer = build_synthetic_tokenizer()
        overrides = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
        overrides.update(s.model_overrides)
        model = build_model_from_config(tiny_model_config(len(tokenizer), **overrides), seed=s.seed)
    else:
        model, tokenizer = load_policy(s.model, dtype=torch.float32, gguf_file=s.gguf_file or None)
    return model.to(device), tokenizer


def encode_examples(task, examples, tokenizer, template: str, max_length: int) -> list[tuple[list[int], int]]:
    """(prompt + target + eos token ids, prompt length) per example."""
    from vineppo.rollout import encode_prompt

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("SFT needs a tokenizer with an eos token (the model must learn to stop)")
    out = []
    for ex in examples:
        prompt = encode_prompt(tokenizer, task.prompt(ex, tokenizer, template), template)
        target = tokenizer(task.sft_target(ex), add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt + target)[:max_length] if max_length else prompt + target
        if len(ids) > len(prompt):
            out.append((ids, len(prompt)))
    if not out:
        raise ValueError("no SFT example has a target token left after truncation")
    return out


def _collate(rows, pad_id: int, device):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, p) in enumerate(rows):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = t
        attention_mask[i, :len(ids)] = 1
        labels[i, p:len(ids)] = t[p:]
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def sft_loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean next-token cross entropy over the labelled (target) tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def run_sft(cfg, output_dir: str | None = None) -> str:
    """Trains and saves (model, tokenizer, settings, loss log) into `output_dir` (default: the
    settings' checkpoint dir); returns that path. The folder appears atomically when done."""
    from transformers import get_cosine_schedule_with_warmup

    s = _as_settings(cfg)
    output_dir = output_dir or s.checkpoint_dir()
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = load_sft_task(s)
    examples = task.train[:s.num_examples] if s.num_examples else task.train
    torch.manual_seed(s.seed)
    model, tokenizer = init_policy(s, device)
    max_length = s.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 0)
    data = encode_examples(task, examples, tokenizer, s.template, max_length)

    steps_per_epoch = math.ceil(len(data) / s.batch_size)
    total_steps = max(1, math.ceil(s.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(s.warmup_ratio * total_steps), total_steps)
    gen = torch.Generator().manual_seed(s.seed)
    order: list[int] = []
    losses: list[float] = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    start = time.perf_counter()
    deadline = start + s.max_minutes * 60 if s.max_minutes else math.inf
    bar = _progress(total_steps, s.progress)
    model.train()
    step = 0
    for step in range(1, total_steps + 1):
        if len(order) < s.batch_size:
            order += torch.randperm(len(data), generator=gen).tolist()
        batch, order = [data[i] for i in order[:s.batch_size]], order[s.batch_size:]
        with autocast:
            loss = sft_loss(model, *_collate(batch, pad_id, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if time.perf_counter() > deadline:
            break
    if bar is not None:
        bar.close()
    model.eval()
    log = {"steps": step, "total_steps": total_steps, "seconds": time.perf_counter() - start,
           "num_examples": len(data), "losses": losses}
    _save_atomically(model, tokenizer, s, log, output_dir)
    return output_dir


def ensure_sft_checkpoint(cfg) -> str:
    """The checkpoint for these settings: reused when it exists, trained otherwise."""
    s = _as_settings(cfg)
    path = s.checkpoint_dir()
    if is_sft_checkpoint(path):
        return path
    return run_sft(s, output_dir=path)


def is_sft_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (SETTINGS_FILE, "config.json"))


def _save_atomically(model, tokenizer, s: SFTSettings, log: dict, output_dir: str) -> None:
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, LOG_FILE), "w") as f:
        json.dump(log, f)
    with open(os.path.join(tmp, SETTINGS_FILE), "w") as f:
        json.dump(dataclasses.asdict(s) | {"key": s.key()}, f, indent=2, default=str)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sft", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> str:
    from vineppo.config import load_config

    cfg = load_config(argv)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    s = settings_from_train_config(cfg)
    path = ensure_sft_checkpoint(s)
    log_path = os.path.join(path, LOG_FILE)
    with open(log_path) as f:
        log = json.load(f)
    tail = log["losses"][-20:]
    print(f"SFT checkpoint: {path} ({log['steps']} steps, {log['seconds']:.0f}s, "
          f"final loss {sum(tail) / max(len(tail), 1):.4f})")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
