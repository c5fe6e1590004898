"""TrainConfig: presets, YAML files, command-line overrides, --help, saving."""

import dataclasses

import pytest

from vineppo.algos import ALGOS
from vineppo.config import TrainConfig, _leaf_fields, configs_dir, format_help, list_presets, load_config

REQUIRED_PRESETS = ("tiny", "gsm8k-rho1b", "math-rho1b", "gsm8k-deepseek7b", "gsm8k-smollm2")


def test_default_is_tiny_preset():
    cfg = load_config([])
    assert cfg.preset == "tiny" and cfg.model.name == "tiny" and cfg.task.name == "synthetic"
    assert cfg.algo == "vineppo"


@pytest.mark.parametrize("name", REQUIRED_PRESETS)
def test_presets_load_and_validate(name):
    assert name in list_presets()
    cfg = load_config(["--preset", name])
    assert cfg.preset == name
    cfg.validate()


def test_paper_presets_use_paper_settings():
    for name in ("gsm8k-rho1b", "math-rho1b", "gsm8k-deepseek7b"):
        cfg = load_config(["--preset", name])
        r, p = cfg.rollout, cfg.ppo
        assert (r.num_prompts, r.num_samples, r.mc_rollouts) == (64, 8, 9)
        assert (r.temperature, r.top_p, r.max_tokens) == (0.6, 0.9, 1024)
        assert (p.lr, p.kl_coef, p.clip_range, p.epochs, p.minibatch_size) == (1e-6, 1e-4, 0.2, 2, 64)
        assert (cfg.eval.n, cfg.eval.temperature) == (16, 0.35)
        assert "realtreetune/" in cfg.model.name
    assert load_config(["--preset", "math-rho1b"]).task.name == "math"
    smol = load_config(["--preset", "gsm8k-smollm2"])
    assert smol.model.name == "smollm2" and smol.rollout.template == "chat"


def test_typed_overrides():
    cfg = load_config(["--ppo.lr", "3e-4", "--rollout.num_samples=6", "--run.tensorboard", "false",
                       "--advantage.whiten", "--algo", "grpo", "--run.max_minutes", "2.5",
                       "--task.name", "gsm8k", "--task.path", "/data/x", "--ppo.minibatch_size", "48"])
    assert cfg.ppo.lr == 3e-4 and isinstance(cfg.ppo.lr, float)
    assert cfg.rollout.num_samples == 6 and isinstance(cfg.rollout.num_samples, int)
    assert cfg.run.tensorboard is False and cfg.advantage.whiten is True
    assert cfg.algo == "grpo" and cfg.run.max_minutes == 2.5 and cfg.task.path == "/data/x"


def test_negative_numbers_and_aliases():
    cfg = load_config(["--seed", "-3", "--resume", "runs/x", "--max-iterations", "5"])
    assert cfg.seed == -3 and cfg.run.resume == "runs/x" and cfg.run.max_iterations == 5


@pytest.mark.parametrize("argv, message", [
    (["--ppo.nope", "1"], "unknown option"),
    (["--lr", "1"], "did you mean .*--ppo.lr"),
    (["--rollout.num_samples", "2.5"], "rollout.num_samples"),
    (["--run.tensorboard", "maybe"], "run.tensorboard"),
    (["--algo", "dqn"], "algo must be one of"),
    (["--ppo.lr", "-0.001"], "--ppo.lr must be > 0"),
    (["--rollout.top_p", "1.5"], r"--rollout.top_p must be in \(0, 1\]"),
    (["--task.on_error", "bogus"], "--task.on_error must be one of raise, skip"),
    (["--preset", "nope"], "unknown preset"),
    (["--rollout.num_prompts", "3", "--ppo.minibatch_size", "64"], "must divide"),
    (["stray"], "unexpected argument"),
    (["--ppo.lr"], "needs a value"),
])
def test_bad_arguments_raise_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        load_config(argv)


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        load_config(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    fields = list(_leaf_fields(TrainConfig()))
    assert len(fields) > 40
    for name, _, f, _ in fields:
        assert f"--{name} " in text, name
        assert f.metadata.get("help"), f"{name} has no help string"
        assert f.metadata["help"] in text
    for preset in REQUIRED_PRESETS:
        assert preset in text


def test_help_shows_the_chosen_presets_defaults():
    text = format_help(load_config(["--preset", "gsm8k-rho1b"]))
    assert "--model.name (str, default 'realtreetune/rho-1b-sft-GSM8K')" in text


def test_config_file_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ppo:\n  lr: 0.5\n  epochs: 3\nrollout:\n  top_p: 0.8\n")
    cfg = load_config(["--preset", "gsm8k-rho1b", "--config", str(path), "--ppo.epochs", "4"])
    assert cfg.ppo.lr == 0.5 and cfg.ppo.epochs == 4 and cfg.rollout.top_p == 0.8
    assert cfg.model.name == "realtreetune/rho-1b-sft-GSM8K"
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  lrr: 1\n")
    with pytest.raises(ValueError, match="unknown config field 'ppo.lrr'"):
        load_config(["--config", str(bad)])


def test_save_and_load_roundtrip(tmp_path):
    cfg = load_config(["--ppo.lr", "0.125", "--algo", "rloo", "--run.name", "x y"])
    cfg.save(tmp_path)
    for name in ("config.json", "config.yaml"):
        again = TrainConfig.load(tmp_path / name)
        assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_algo_accepted_and_presets_dir_beside_package():
    for algo in ALGOS:
        assert load_config(["--algo", algo]).algo == algo
    assert (configs_dir() / "tiny.yaml").is_file()
    assert configs_dir().parent.joinpath("vineppo", "config.py").is_file()


def test_task_on_error_reaches_the_loader(tmp_path):
    from vineppo.tasks import load_task_from_config as load_task_for

    data = tmp_path / "gsm8k"
    data.mkdir()
    good = '{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
    (data / "train.jsonl").write_text(good + '{"question": "no answer"}\n' + good)
    (data / "test.jsonl").write_text(good)
    argv = ["--preset", "gsm8k-rho1b", "--task.path", str(data)]
    with pytest.raises(ValueError, match="train.jsonl:2"):
        load_task_for(load_config(argv).task)
    task = load_task_for(load_config(argv + ["--task.on_error", "skip"]).task)
    assert len(task.train) == 2 and task.num_skipped == 1
