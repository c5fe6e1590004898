"""SFT (training, masking, checkpoint reuse) and evaluation (engine vs. transformers generate)."""

import dataclasses
import json
import os

import pytest
import torch

from vineppo.engine import Engine, EngineConfig, SamplingParams, derive_seed
from vineppo.evaluate import accuracy_by_meta, evaluate
from vineppo.evaluate import main as evaluate_main
from vineppo.rollout import decode_response, score
from vineppo.tasks import prompt_ids
from vineppo.sft import LOG_FILE, SFTConfig, _collate, encode_examples, ensure_sft_checkpoint, run_sft


@pytest.fixture(scope="module")
def sft(short_sft):
    """The short SFT of tests/conftest.py (shared through the session's cache dir)."""
    return short_sft.path, short_sft.model, short_sft.tokenizer, short_sft, short_sft.task


def test_sft_reduces_loss_and_is_reused(sft, make_sft_job, monkeypatch):
    path, _, _, short, _ = sft
    job, cache = short.job, short.cache_dir
    with open(os.path.join(path, LOG_FILE)) as f:
        log = json.load(f)
    losses = log["losses"]
    assert log["steps"] == log["total_steps"] == 114  # 3 epochs * ceil(600 / 16)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert path == job.checkpoint_dir(cache) and os.path.basename(path).startswith("synthetic-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sft_settings.json"):
        assert os.path.isfile(os.path.join(path, name)), name

    def fail(*a, **k):
        raise AssertionError("the checkpoint should have been reused")

    monkeypatch.setattr("vineppo.sft.run_sft", fail)
    assert ensure_sft_checkpoint(job, cache) == path
    # settings that change the result get their own checkpoint; where files go does not
    assert make_sft_job(lr=5e-3).key() != job.key()
    assert dataclasses.replace(job, task=dataclasses.replace(job.task, num_steps=3)).key() != job.key()
    assert make_sft_job(output_dir="/elsewhere").key() == job.key()


def test_sft_labels_cover_only_the_target(sft):
    _, _, tokenizer, _, task = sft
    ex = task.train[0]
    (ids, p), = encode_examples(task, [ex], tokenizer, "plain", max_length=0)
    prompt = prompt_ids(task, ex, tokenizer, "plain")
    target = tokenizer(task.sft_target(ex), add_special_tokens=False)["input_ids"]
    assert p == len(prompt) and ids == prompt + target + [tokenizer.eos_token_id]
    input_ids, mask, labels = _collate([(ids, p), (ids[:p + 2], p)], tokenizer.pad_token_id, "cpu")
    assert (labels[0, :p] == -100).all() and labels[0, p:].tolist() == ids[p:]
    assert labels[1, p:p + 2].tolist() == ids[p:p + 2] and (labels[1, p + 2:] == -100).all()
    assert mask[1].sum() == p + 2


def test_run_sft_from_a_saved_model_folder(sft, make_sft_job, tmp_path):
    """Any load_policy path works as the starting model (here the tiny SFT checkpoint itself)."""
    path = sft[0]
    job = dataclasses.replace(make_sft_job(epochs=1.0, num_examples=32, batch_size=8, lr=1e-4), model=path)
    out = run_sft(job, str(tmp_path / "out"), progress=False)
    with open(os.path.join(out, LOG_FILE)) as f:
        log = json.load(f)
    assert log["steps"] == 4 and all(x == x for x in log["losses"])


def test_sft_settings_validation():
    with pytest.raises(ValueError, match="epochs"):
        SFTConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        SFTConfig(batch_size=0)


def _hf_greedy(model, tokenizer, prompt_ids, max_tokens):
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    finished = tokenizer.eos_token_id in new
    if finished:
        new = new[:new.index(tokenizer.eos_token_id) + 1]
    return new, "stop" if finished else "length"


def test_evaluate_greedy_matches_transformers_generate(sft):
    _, model, tokenizer, _, task = sft
    prompts = [prompt_ids(task, ex, tokenizer, "plain") for ex in task.test[:8]]
    greedy = [_hf_greedy(model, tokenizer, p, 48) for p in prompts]
    # Half the problems get the model's own final answer as their reference, so that both grades
    # occur whatever the small model's skill: the engine must reproduce which ones it gets right.
    examples = []
    for i, (ex, (ids, _)) in enumerate(zip(task.test[:8], greedy)):
        text = decode_response(tokenizer, ids)
        assert "####" in text, text
        examples.append(dataclasses.replace(ex, answer=text.rsplit("####", 1)[1].strip()) if i % 2 else ex)
    engine = Engine(model, tokenizer, EngineConfig(num_pages=256, page_size=8))
    result = evaluate(engine, task, examples, tokenizer, n=1, temperature=0.0, top_p=1.0, max_tokens=48,
                      template="plain")
    expected = [score(task, decode_response(tokenizer, ids), ex, reason) for ex, (ids, reason) in zip(examples, greedy)]
    assert result["per_problem"] == expected
    assert result["accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert result["greedy_pass@1"] == result["accuracy"] == result["pass@1"]
    assert result["num_problems"] == 8 and result["num_samples"] == 1
    assert 0 < result["accuracy"] < 1
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
    assert [list(group[0].token_ids) for group in outs] == [ids for ids, _ in greedy]


def test_evaluate_sampling_is_the_mean_over_problems_and_samples(sft):
    _, model, tokenizer, _, task = sft
    examples = task.test[:5]
    engine = Engine(model, tokenizer, EngineConfig(num_pages=256, page_size=8))
    result = evaluate(engine, task, examples, tokenizer, n=4, temperature=0.7, top_p=0.9, max_tokens=48,
                      template="plain", seed=3)
    assert "greedy_pass@1" not in result and result["num_samples"] == 4
    prompts = [prompt_ids(task, ex, tokenizer, "plain") for ex in examples]
    # example i samples with its own seed derived from (seed, i)
    outs = engine.generate(prompts, [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=48, n=4,
                                                    seed=derive_seed(3, i)) for i in range(5)])
    per_problem = [sum(score(task, decode_response(tokenizer, c.token_ids), ex, c.finish_reason)
                       for c in group) / 4 for ex, group in zip(examples, outs)]
    assert result["per_problem"] == per_problem
    assert result["accuracy"] == pytest.approx(sum(per_problem) / 5)
    assert result["accuracy_by"] == accuracy_by_meta(examples, per_problem)
    with pytest.raises(ValueError):
        evaluate(engine, task, examples, tokenizer, n=0, temperature=0.7, top_p=0.9, max_tokens=8)


def test_accuracy_by_meta_groups_plain_values():
    from vineppo.tasks.base import Example

    def ex(i, **meta):
        return Example(id=str(i), question="q", answer="1", solution="#### 1", meta=meta)

    examples = [ex(0, level=1, subject="algebra", tags=["a"]), ex(1, level=2, subject="algebra", tags=[]),
                ex(2, level=2, subject="algebra", tags=[]), ex(3, level=3, subject="geometry", tags=[])]
    by = accuracy_by_meta(examples, [1.0, 0.5, 0.0, 0.25])
    assert by["level"] == {"1": [1.0, 1], "2": [0.25, 2], "3": [0.25, 1]}
    assert by["subject"] == {"algebra": [0.5, 3], "geometry": [0.25, 1]}
    assert "tags" not in by                                   # lists are not a grouping
    assert accuracy_by_meta(examples, [1.0] * 4, max_groups=2).keys() == {"subject"}
    # a key that some examples lack, or that takes one value only, gives no grouping
    assert accuracy_by_meta(examples + [ex(4)], [1.0] * 5) == {}


def test_evaluate_cli_uses_the_checkpoints_task(sft, tmp_path, capsys):
    path, model, tokenizer, _, task = sft
    out = tmp_path / "eval.json"
    result = evaluate_main(["--model", path, "--limit", "6", "--n", "1",
                            "--temperature", "0", "--max-tokens", "48", "--output", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "accuracy" in printed
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["num_problems"] == 6
    assert saved["task"] == "synthetic" and saved["task_config"]["num_steps"] == sft[3].job.task.num_steps
    engine = Engine(model, tokenizer, EngineConfig(num_pages=256, page_size=8))
    direct = evaluate(engine, task, task.test[:6], tokenizer, n=1, temperature=0.0, top_p=1.0, max_tokens=48)
    assert direct["per_problem"] == result["per_problem"]
    assert saved["accuracy_by"] == accuracy_by_meta(task.test[:6], result["per_problem"])
    assert all(f"by {key}:" in printed for key in saved["accuracy_by"])


def test_job_follows_the_train_config():
    from vineppo.config import TrainConfig
    from vineppo.sft import cache_dir_of, job_from_train_config

    cfg = TrainConfig()
    cfg.task.max_train = 100
    job = job_from_train_config(cfg)
    assert (job.task, job.model, job.sft.lr, job.sft.batch_size, job.sft.seed) == (
        cfg.task, cfg.model.name, cfg.sft.lr, cfg.sft.batch_size, cfg.sft.seed)
    assert job.sft.num_examples == 100 and cfg.sft.num_examples == 0
    assert cache_dir_of(cfg) == os.path.join(cfg.run.output_dir, "sft")


def test_sft_cli_trains_then_reuses(tmp_path, capsys):
    from vineppo.sft import main

    argv = ["--task.num_train", "40", "--task.num_test", "5", "--sft.epochs", "1", "--sft.batch_size", "20",
            "--sft.output_dir", str(tmp_path), "--run.progress", "false"]
    path = main(argv)
    assert os.path.dirname(path) == str(tmp_path) and "2 steps" in capsys.readouterr().out
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert main(argv) == path and os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime


def test_sft_cut_short_is_continued_to_its_planned_steps(make_sft_job, tmp_path, monkeypatch, capsys):
    """A wall-clock cap stops SFT early; the next call continues it, and the result equals an
    uninterrupted SFT bit for bit."""
    import vineppo.sft as sft_mod
    from safetensors.torch import load_file

    job = make_sft_job(epochs=1.0, num_examples=64, batch_size=16, max_minutes=1.0)   # 4 planned steps
    straight = ensure_sft_checkpoint(dataclasses.replace(job, sft=dataclasses.replace(job.sft, max_minutes=0.0)),
                                     str(tmp_path / "a"), progress=False)
    clock = {"t": 0.0}

    def fake_clock():   # each step takes 25 s: the 1-minute cap stops SFT after 3 of 4 steps
        clock["t"] += 25.0
        return clock["t"]
    monkeypatch.setattr(sft_mod.time, "perf_counter", fake_clock)
    cut = ensure_sft_checkpoint(job, str(tmp_path / "b"), progress=False)
    assert sft_mod.sft_status(cut) == (3, 4, True)
    assert "stopped after 3 of 4 planned steps" in capsys.readouterr().out
    monkeypatch.undo()
    again = ensure_sft_checkpoint(job, str(tmp_path / "b"), progress=False)
    assert again == cut and "continuing it" in capsys.readouterr().out
    assert sft_mod.sft_status(cut) == (4, 4, False)
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(straight, LOG_FILE)) as f, open(os.path.join(cut, LOG_FILE)) as g:
        assert json.load(f)["losses"] == json.load(g)["losses"]
    ensure_sft_checkpoint(job, str(tmp_path / "b"), progress=False)
    assert "reusing" in capsys.readouterr().out


def test_majority_vote_and_pass_at_n():
    from vineppo.evaluate import majority_vote

    assert majority_vote(["3", "4", "4", None], [0.0, 1.0, 1.0, 0.0]) == 1.0
    assert majority_vote(["3", "4", "3", "4"], [0.0, 1.0, 0.0, 1.0]) == 0.0     # tie: the first sampled
    assert majority_vote([None, None], [0.0, 0.0]) == 0.0


def test_evaluate_reports_majority_and_pass_at_n(sft):
    _, model, tokenizer, _, task = sft
    engine = Engine(model, tokenizer, EngineConfig(num_pages=256, page_size=8))
    result = evaluate(engine, task, task.test[:6], tokenizer, n=4, temperature=1.0, top_p=1.0, max_tokens=48,
                      seed=1)
    assert result["accuracy"] <= result["pass@4"] and 0.0 <= result["majority"] <= result["pass@4"]
    assert result["pass@4"] == pytest.approx(sum(p > 0 for p in result["per_problem"]) / 6)


def test_paper_protocol_fixes_the_sampling(sft, capsys):
    from vineppo.evaluate import _parse_args

    args = _parse_args(["--model", "m", "--protocol", "paper"])
    assert (args.n, args.temperature, args.top_p, args.max_tokens, args.split, args.limit) == \
        (16, 0.35, 0.9, 1024, "test", 0)
    assert _parse_args(["--model", "m"]).max_tokens == 512
    with pytest.raises(SystemExit):
        _parse_args(["--model", "m", "--protocol", "paper", "--n", "4"])
    assert "--protocol paper fixes --n 16" in capsys.readouterr().err
