"""Shared fixtures: tiny random models built from configs and one short SFT of the synthetic task."""

import dataclasses
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")   # ../shared/data beside the checkout

# The short SFT several tests start from: two-operation problems, a 2-layer Llama.
SFT_TASK = {"num_steps": 2, "max_operand": 6, "max_multiplier": 1, "max_value": 15, "num_train": 600,
            "num_test": 20}
SFT_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def build_tiny_lm(arch: str = "llama", *, vocab: int = 384, hidden: int = 64, intermediate: int = 128,
                  layers: int = 2, heads: int = 4, kv_heads: int = 2, max_positions: int = 256,
                  tied: bool = False, seed: int = 0, **config):
    """A random transformers causal LM (llama | qwen2 | mistral), initialised from `seed`, in eval mode."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
              tie_word_embeddings=tied)
    kw.update(config)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cls(**kw)).eval()


def build_synthetic_lm(seed: int = 0, **overrides):
    """(model, tokenizer): the tiny preset's Llama shrunk to 2 layers of width 32, on the synthetic
    task's character tokenizer."""
    from vineppo.models import build_model_from_config, tiny_model_config
    from vineppo.tasks import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    model = build_model_from_config(tiny_model_config(len(tok), **kw), seed=seed, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny_lm():
    """`build_tiny_lm`, for tests that build their own random models."""
    return build_tiny_lm


@pytest.fixture(scope="session")
def synthetic_lm():
    """`build_synthetic_lm`, for tests that need the synthetic tokenizer."""
    return build_synthetic_lm


def sft_job(**sft):
    """The short SFT job, with SFTConfig fields overridden by `sft`."""
    from vineppo.sft import SFTConfig, SFTJob
    from vineppo.tasks import TaskConfig

    config = dict(epochs=3.0, batch_size=16, lr=1e-2, seed=0)
    config.update(sft)
    return SFTJob(sft=SFTConfig(**config), task=TaskConfig(**SFT_TASK), model_overrides=dict(SFT_MODEL))


@dataclasses.dataclass
class ShortSFT:
    path: str
    model: object
    tokenizer: object
    job: object
    task: object
    cache_dir: str


@pytest.fixture(scope="session")
def short_sft(tmp_path_factory):
    """A tiny model after a short SFT (trained once per session): it writes the solution format,
    right or wrong."""
    from vineppo.models import load_policy
    from vineppo.sft import ensure_sft_checkpoint
    from vineppo.tasks import load_task_from_config

    job = sft_job()
    cache = str(tmp_path_factory.getbasetemp() / "sft-cache")
    path = ensure_sft_checkpoint(job, cache, progress=False)
    model, tokenizer = load_policy(path)
    return ShortSFT(path, model, tokenizer, job, load_task_from_config(job.task), cache)


@pytest.fixture(scope="session")
def make_sft_job():
    """`sft_job`: the short SFT's job with other SFTConfig values."""
    return sft_job


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with the synthetic task's tokenizer, saved like an SFT checkpoint."""
    model, tok = build_synthetic_lm()
    path = str(tmp_path_factory.mktemp("tiny_model"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def small_args(model_dir, run_dir, algo="vineppo", *extra):
    """`python -m vineppo.train` arguments of a 2-iteration run on the tiny random model."""
    return ["--model.name", model_dir, "--sft.enabled", "false", "--algo", algo, "--run.run_dir", str(run_dir),
            "--task.num_train", "64", "--task.num_test", "8", "--rollout.num_prompts", "2",
            "--rollout.num_samples", "4", "--rollout.mc_rollouts", "2", "--rollout.max_steps", "3",
            "--rollout.max_tokens", "12", "--rollout.top_p", "1.0", "--ppo.num_iterations", "2",
            "--ppo.minibatch_size", "4", "--ppo.micro_batch_size", "1", "--ppo.lr", "3e-3",
            "--ppo.value_lr", "3e-3", "--ppo.kl_coef", "0.1", "--eval.limit", "2", "--eval.n", "1",
            "--eval.every", "0", "--engine.num_pages", "64", "--run.progress", "false", "--run.tensorboard",
            "false", "--run.save_every", "1", "--run.device", "cpu", *extra]


@pytest.fixture(scope="session")
def train_args():
    """`small_args`."""
    return small_args
