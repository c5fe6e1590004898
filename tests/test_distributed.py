"""FSDP2 on CPU: two gloo ranks give the same loss, gradients and update as one process."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from vineppo.distributed import DistContext
from vineppo.learner import Learner, PPOConfig, optimizer_step, total_optimizer_steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config() -> PPOConfig:
    # a large Adam epsilon keeps the first update a smooth function of the gradient (with the
    # default, near-zero gradient entries turn into +-lr steps whose sign is rounding noise)
    return PPOConfig(minibatch_size=8, micro_batch_size=2, lr=1e-2, value_lr=1e-2, warmup_ratio=0.0, kl_coef=0.1,
                     entropy_coef=0.01, grad_clip=0.5, adam_eps=1e-3)


TEMPERATURE = 0.7
EPISODES_PER_ITERATION = 8


def _models():
    from vineppo.models import ValueModel, build_model_from_config, tiny_model_config

    conf = tiny_model_config(40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    policy = build_model_from_config(conf, seed=1, dtype=torch.float32)
    ref = build_model_from_config(conf, seed=2, dtype=torch.float32).requires_grad_(False)
    value = ValueModel.from_policy(policy, head_seed=3)
    return policy, ref, value


def _data():
    """8 episodes: left-padded prompts, right-padded responses, random old logprobs/advantages."""
    from vineppo.learner import Minibatch

    gen = torch.Generator().manual_seed(0)
    E, P, L = 8, 5, 7
    input_ids = torch.randint(1, 40, (E, P + L), generator=gen)
    attention_mask = torch.ones(E, P + L, dtype=torch.long)
    mask = torch.zeros(E, L)
    for i in range(E):
        p = int(torch.randint(2, P + 1, (1,), generator=gen))
        r = int(torch.randint(1, L + 1, (1,), generator=gen))
        attention_mask[i, :P - p] = 0
        input_ids[i, :P - p] = 0
        attention_mask[i, P + r:] = 0
        input_ids[i, P + r:] = 0
        mask[i, :r] = 1
    rnd = lambda: torch.randn(E, L, generator=gen)  # noqa: E731
    return Minibatch(input_ids, attention_mask, P, mask, advantages=rnd() * mask,
                     old_logprobs=(-2.0 + 0.3 * rnd()) * mask, ref_logprobs=(-2.0 + 0.3 * rnd()) * mask,
                     old_values=0.1 * rnd() * mask, returns=rnd() * mask)


def _step(ctx: DistContext, policy, ref, value, mb):
    from vineppo.distributed import full_state_dict, full_tensor

    cfg = _config()
    steps = total_optimizer_steps(cfg, EPISODES_PER_ITERATION)
    stats = optimizer_step(Learner.create(policy, cfg.lr, cfg, steps), Learner.create(value, cfg.value_lr, cfg, steps),
                           mb, cfg, TEMPERATURE, ctx)
    grads = {n: full_tensor(p.grad).clone() for n, p in policy.named_parameters()}
    vgrads = {n: full_tensor(p.grad).clone() for n, p in value.named_parameters()}
    return stats, grads, vgrads, full_state_dict(policy), full_state_dict(value)


def _worker(rank: int, world: int, port: int, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vineppo.distributed import shard_model

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), mesh=mesh)
        policy, ref, value = _models()
        for m in (policy, ref, value):
            shard_model(m, mesh)
        mb = _data()
        half = mb.mask.shape[0] // world
        local = mb.select(torch.arange(rank * half, (rank + 1) * half))
        result = _step(ctx, policy, ref, value, local)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def test_two_rank_fsdp_matches_single_process(tmp_path):
    torch.set_num_threads(1)
    policy, ref, value = _models()
    single = _step(DistContext(), policy, ref, value, _data())

    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    stats, grads, vgrads, params, vparams = torch.load(out, weights_only=False)

    s_stats, s_grads, s_vgrads, s_params, s_vparams = single
    for key in ("loss", "value_loss", "pg_loss", "kl", "entropy", "grad_norm", "value_grad_norm", "clip_frac"):
        assert stats[key] == pytest.approx(s_stats[key], abs=1e-6, rel=1e-6), key
    assert s_stats["grad_norm"] > 0.5  # clipping is active, so the clipped gradients are compared too
    assert s_stats["clip_frac"] > 0
    for ours, theirs in ((grads, s_grads), (vgrads, s_vgrads), (params, s_params), (vparams, s_vparams)):
        assert ours.keys() == theirs.keys()
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    # the update moved the weights (so the parameter comparison above is not vacuous)
    fresh, _, _ = _models()
    moved = max(float((fresh.state_dict()[n] - s_params[n]).abs().max()) for n in s_params if n in fresh.state_dict())
    assert moved > 1e-4


def test_copy_full_weights_and_global_whiten_single_process():
    from vineppo.algos import whiten
    from vineppo.distributed import copy_full_weights
    from vineppo.trainer import global_whiten

    policy, ref, _ = _models()
    copy_full_weights(policy, ref)
    for (n, a), (_, b) in zip(policy.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    x, m = torch.randn(4, 6, dtype=torch.float64), (torch.rand(4, 6) > 0.3).double()
    torch.testing.assert_close(global_whiten(x, m, DistContext()), whiten(x, m))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
