"""Process groups, FSDP2 sharding, and full-weight gathering for the per-rank engines.

Under `torchrun` every rank trains one shard of the policy (FSDP2 `fully_shard` per decoder layer,
then the root) and runs its own rollout engine on an unsharded copy of the weights, refreshed
after each update by gathering the full parameters. Without torchrun there is no process group
at all: one process, one model, and the engine reads the trained parameters in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vineppo.settings import check_settings, setting

WRAPPER_PREFIX = "_checkpoint_wrapped_module."


@dataclass
class DistConfig:
    """Sharding and precision of the trained models; the `dist` section of the CLI."""

    mixed_precision: str = setting("auto", "FSDP2 param/compute dtype: auto (bfloat16 on GPU, float32 on CPU), "
                                   "float32, bfloat16", choices=("auto", "float32", "bfloat16"))
    activation_checkpointing: str = setting("auto", "auto (on for GPU), on, off", choices=("auto", "on", "off"))
    reshard_after_forward: bool = setting(True, "FSDP2: free gathered parameters after each layer's forward")

    def __post_init__(self):
        check_settings(self)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None        # torch.distributed.device_mesh.DeviceMesh when distributed

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "") -> DistContext:
    """A DistContext from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process.

    NCCL on CUDA, gloo on CPU; the device mesh is 1-D over all ranks.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world_size <= 1 or "RANK" not in os.environ:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistContext(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    mesh = init_device_mesh(dev.type, (world_size,))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, mesh=mesh)


def destroy_distributed(ctx: DistContext) -> None:
    if ctx.distributed:
        if dist.is_initialized():
            dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Llama-family model (or a ValueModel wrapping one)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (transformers' own hook keeps names)."""
    target = model if hasattr(model, "gradient_checkpointing_enable") else None
    if target is None:
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_model(model: nn.Module, mesh, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Applies FSDP2 in place: `fully_shard` on every decoder layer, then on the root.

    `param_dtype` (e.g. bfloat16) sets the mixed-precision compute dtype; gradients are reduced and
    the sharded master weights kept in float32. None keeps everything in the parameters' dtype.
    """
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; an all-gather on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clean_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor} of the model's state dict (collective: call on every rank)."""
    return {clean_name(n): full_tensor(t.detach()) for n, t in model.state_dict().items()}


@torch.no_grad()
def copy_full_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copies the (possibly FSDP-sharded) parameters of `src` into the plain module `dst`, in place.

    Parameters are gathered one at a time so the peak extra memory is one full tensor. Tied
    weights appear once in `named_parameters` and are shared in `dst` as well.
    """
    dst_params = dict(dst.named_parameters())
    seen = 0
    for name, p in src.named_parameters():
        name = clean_name(name)
        if name not in dst_params:
            raise ValueError(f"parameter {name} of the trained model is missing from the engine's copy")
        target = dst_params[name]
        full = full_tensor(p.detach())
        if full.shape != target.shape:
            raise ValueError(f"parameter {name}: shape {tuple(full.shape)} != engine copy {tuple(target.shape)}")
        target.copy_(full)
        seen += 1
    if seen != len(dst_params):
        raise ValueError(f"engine copy has {len(dst_params)} parameters, the trained model {seen}")


def all_reduce(t: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum / max / min) across ranks; a no-op in a single process."""
    if ctx.distributed:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
    return t


def all_gather_object(obj, ctx: DistContext) -> list:
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state of an FSDP2 model as full (unsharded) CPU tensors keyed by parameter name.

    Collective: call on every rank; only rank 0 receives the state (others get an empty dict).
    """
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, path: str) -> None:
    """Loads a full optimizer state (as written from `full_optimizer_state`) into a sharded optimizer."""
    if not os.path.isfile(path):
        raise ValueError(f"no optimizer state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
