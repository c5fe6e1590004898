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
from tqdm.auto import tqdm

from vineppo.checkpoint import load_module_state, read_model_state_dict
from vineppo.models import build_model_from_config, load_policy, quiet_transformers, tiny_model_config
from vineppo.saved_task import SFT_SETTINGS_FILE
from vineppo.scoring import autocast
from vineppo.settings import check_settings, setting
from vineppo.tasks import TaskConfig, build_synthetic_tokenizer, load_task_from_config, prompt_ids

LOG_FILE = "sft_log.json"
PROGRESS_FILE = "sft_progress.pt"   # only in a checkpoint that stopped short of its planned steps


@dataclass
class SFTConfig:
    """The supervised warm start of the tiny preset; the `sft` section of the CLI."""

    enabled: bool = setting(True, "with model.name=tiny: run SFT first when no checkpoint for these settings "
                            "exists")
    output_dir: str = setting("", "where SFT checkpoints live (default: <run.output_dir>/sft)")
    epochs: float = setting(1.0, "passes over the SFT data (may be fractional)", check="> 0")
    num_examples: int = setting(0, "SFT examples from the train split (0 = all)", check=">= 0")
    batch_size: int = setting(32, "sequences per optimizer step", check=">= 1")
    lr: float = setting(3e-3, "AdamW peak learning rate (cosine decay)", check="> 0")
    warmup_ratio: float = setting(0.03, "fraction of SFT steps spent warming the learning rate up", check="[0, 1)")
    weight_decay: float = setting(0.0, "AdamW weight decay", check=">= 0")
    grad_clip: float = setting(1.0, "max global gradient norm (0 = off)", check=">= 0")
    max_length: int = setting(0, "truncate examples to this many tokens (0 = the model's context)", check=">= 0")
    max_minutes: float = setting(0.0, "wall-clock cap on SFT (0 = none)", check=">= 0")
    seed: int = setting(0, "seed of SFT initialisation and data order (independent of the RL --seed, so "
                        "runs with different seeds start from the same SFT checkpoint)")

    def __post_init__(self):
        check_settings(self)


# SFTConfig fields that decide where checkpoints go or whether SFT runs, not what it produces
_NOT_IN_KEY = ("enabled", "output_dir", "max_minutes")


@dataclass
class SFTJob:
    """Everything an SFT checkpoint depends on; `key()` hashes it."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: str = "tiny"                                  # "tiny" or anything load_policy accepts
    gguf_file: str = ""
    template: str = "plain"
    model_overrides: dict = field(default_factory=dict)  # tiny_model_config overrides

    def key(self) -> str:
        data = dataclasses.asdict(self)
        for name in _NOT_IN_KEY:
            data["sft"].pop(name)
        if self.task.name == "synthetic":  # same knobs, new generator: different data, so a new checkpoint
            from vineppo.tasks.synthetic import GENERATOR_VERSION

            data["synthetic_generator"] = GENERATOR_VERSION
        blob = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def checkpoint_dir(self, cache_dir: str) -> str:
        return os.path.join(cache_dir, f"{self.task.name}-{self.key()}")


def job_from_train_config(cfg) -> SFTJob:
    """The SFT job of a `vineppo.config.TrainConfig`: the same task and model as RL; the seeds are
    the config's ``sft.seed`` and ``task.seed``, never the RL seed, and RL's ``task.max_train``
    caps the SFT examples too."""
    sft = dataclasses.replace(cfg.sft)
    if cfg.task.max_train and (sft.num_examples == 0 or sft.num_examples > cfg.task.max_train):
        sft.num_examples = cfg.task.max_train
    return SFTJob(sft=sft, task=dataclasses.replace(cfg.task), model=cfg.model.name, gguf_file=cfg.model.gguf_file,
                  template=cfg.rollout.template)


def cache_dir_of(cfg) -> str:
    """Where a train config's SFT checkpoints live."""
    return cfg.sft.output_dir or os.path.join(cfg.run.output_dir, "sft")


def init_policy(job: SFTJob, device):
    """(model, tokenizer) before SFT: the tiny Llama with the synthetic tokenizer, or a loaded model."""
    if job.model == "tiny":
        tokenizer = build_synthetic_tokenizer()
        overrides = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
        overrides.update(job.model_overrides)
        model = build_model_from_config(tiny_model_config(len(tokenizer), **overrides), seed=job.sft.seed)
    else:
        model, tokenizer = load_policy(job.model, dtype=torch.float32, gguf_file=job.gguf_file or None)
    return model.to(device), tokenizer


def encode_examples(task, examples, tokenizer, template: str, max_length: int) -> list[tuple[list[int], int]]:
    """(prompt + target + eos token ids, prompt length) per example."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("SFT needs a tokenizer with an eos token (the model must learn to stop)")
    out = []
    for ex in examples:
        prompt = prompt_ids(task, ex, tokenizer, template)
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


def run_sft(job: SFTJob, output_dir: str, device: str = "", progress: bool = True, resume: bool = False) -> str:
    """Trains and saves (model, tokenizer, job, loss log) into `output_dir`; returns that path.
    The folder appears atomically when saved. With `resume`, a checkpoint there that stopped short
    of its planned steps (``sft.max_minutes``) goes on from where it stopped, exactly as if it had
    never stopped."""
    from transformers import get_cosine_schedule_with_warmup

    s = job.sft
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = load_task_from_config(job.task)
    examples = task.train[:s.num_examples] if s.num_examples else task.train
    torch.manual_seed(s.seed)
    model, tokenizer = init_policy(job, device)
    max_length = s.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 0)
    data = encode_examples(task, examples, tokenizer, job.template, max_length)

    steps_per_epoch = math.ceil(len(data) / s.batch_size)
    total_steps = max(1, math.ceil(s.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(s.warmup_ratio * total_steps), total_steps)
    gen = torch.Generator().manual_seed(s.seed)
    order: list[int] = []
    losses: list[float] = []
    done, seconds = 0, 0.0
    if resume:
        done, seconds, order, losses = _load_progress(output_dir, model, optimizer, scheduler, gen)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    deadline = start + s.max_minutes * 60 if s.max_minutes else math.inf
    bar = tqdm(total=total_steps, initial=done, desc="sft", dynamic_ncols=True, disable=not progress)
    model.train()
    step = done
    for step in range(done + 1, total_steps + 1):
        if len(order) < s.batch_size:
            order += torch.randperm(len(data), generator=gen).tolist()
        batch, order = [data[i] for i in order[:s.batch_size]], order[s.batch_size:]
        with autocast(device, torch.bfloat16 if device.type == "cuda" else None):
            loss = sft_loss(model, *_collate(batch, pad_id, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if time.perf_counter() > deadline and step < total_steps:
            bar.write(f"SFT stopped after {step} of {total_steps} planned steps (sft.max_minutes "
                      f"{s.max_minutes}); the next run continues it")
            break
    bar.close()
    model.eval()
    log = {"steps": step, "total_steps": total_steps, "seconds": seconds + time.perf_counter() - start,
           "num_examples": len(data), "losses": losses}
    progress_state = None
    if step < total_steps:   # what continuing needs besides the weights
        progress_state = {"order": order, "generator": gen.get_state(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict()}
    _save_atomically(model, tokenizer, job, log, output_dir, progress_state)
    return output_dir


def _load_progress(path: str, model, optimizer, scheduler, gen) -> tuple[int, float, list[int], list[float]]:
    """Restores a stopped SFT checkpoint's weights and training state; returns (steps done,
    seconds spent, the data order left, the losses so far)."""
    state = torch.load(os.path.join(path, PROGRESS_FILE), weights_only=True)
    with open(os.path.join(path, LOG_FILE)) as f:
        log = json.load(f)
    load_module_state(model, read_model_state_dict(path, ""), path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return log["steps"], log["seconds"], list(state["order"]), list(log["losses"])


def sft_status(path: str) -> tuple[int, int, bool] | None:
    """(steps done, steps planned, can be continued) of the SFT checkpoint at `path`, or None."""
    if not is_sft_checkpoint(path):
        return None
    with open(os.path.join(path, LOG_FILE)) as f:
        log = json.load(f)
    return log["steps"], log["total_steps"], os.path.isfile(os.path.join(path, PROGRESS_FILE))


def ensure_sft_checkpoint(job: SFTJob, cache_dir: str, device: str = "", progress: bool = True) -> str:
    """The checkpoint for this job under `cache_dir`: reused when it did all its planned steps,
    continued to them when it stopped short, trained otherwise; says which on stdout."""
    path = job.checkpoint_dir(cache_dir)
    status = sft_status(path)
    if status is not None and status[0] >= status[1]:
        print(f"SFT: reusing {path} ({status[0]} steps)", flush=True)
        return path
    if status is not None and status[2]:
        print(f"SFT: {path} stopped after {status[0]} of {status[1]} planned steps; continuing it", flush=True)
        return run_sft(job, path, device, progress, resume=True)
    if status is not None:
        print(f"SFT: {path} stopped after {status[0]} of {status[1]} planned steps and cannot be continued; "
              f"training it again", flush=True)
    else:
        print(f"SFT: training {path}", flush=True)
    return run_sft(job, path, device, progress)


def is_sft_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (SFT_SETTINGS_FILE, "config.json"))


def _save_atomically(model, tokenizer, job: SFTJob, log: dict, output_dir: str, progress_state: dict | None) -> None:
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if progress_state is not None:
        torch.save(progress_state, os.path.join(tmp, PROGRESS_FILE))
    with open(os.path.join(tmp, LOG_FILE), "w") as f:
        json.dump(log, f)
    with open(os.path.join(tmp, SFT_SETTINGS_FILE), "w") as f:
        json.dump(dataclasses.asdict(job) | {"key": job.key()}, f, indent=2, default=str)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


def main(argv: list[str] | None = None) -> str:
    from vineppo.config import load_config   # the CLI config nests this module's SFTConfig

    cfg = load_config(argv)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    path = ensure_sft_checkpoint(job_from_train_config(cfg), cache_dir_of(cfg), cfg.run.device, cfg.run.progress)
    with open(os.path.join(path, LOG_FILE)) as f:
        log = json.load(f)
    tail = log["losses"][-20:]
    print(f"SFT checkpoint: {path} ({log['steps']} steps, {log['seconds']:.0f}s, "
          f"final loss {sum(tail) / max(len(tail), 1):.4f})")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
