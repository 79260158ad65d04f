"""Process group, rank helpers and FSDP2 wrapping, shared by the teacher and the trainer.

Single process when WORLD_SIZE is unset or 1 (no process group is created); under torchrun, NCCL on
CUDA and gloo on CPU. Every helper here also works, as a no-op or identity, in a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        log.info("joined process group: rank %d of %d, backend %s, device %s", rank, world, backend, device)
    return DistInfo(rank, world, local_rank, device)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group; barrier=False on an error path, where other ranks may never arrive."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(value: float | int, op: str = "sum", device: torch.device | None = None) -> float:
    """Reduce a Python number over ranks (float64 on the wire, so token counts stay exact)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.item()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object on every rank (e.g. an error message, so all ranks fail together)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks of a Hugging Face causal LM."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; FSDP needs a model with "
                     "model.layers / transformer.h")


def unwrapped_class(model: nn.Module) -> type:
    """The model's own class: fully_shard swaps in a subclass named FSDP<Class>, which must not leak into
    what a store records (a store made by 2 ranks must resume with 1)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_wrap(model: nn.Module, param_dtype: torch.dtype | None, reshard_after_forward: bool = True,
              inference: bool = False) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root.

    The mixed-precision policy casts parameters to `param_dtype` for compute and reduces gradients in
    fp32; `output_dtype=float32` goes on the root only (DESIGN.md gotcha), so the loss sees fp32 logits.

    inference (a teacher, forward only) trades a few more collectives for a lower peak of memory, since a
    unit's all-gather costs 2-4x the unit's size while it runs (the gathered output, the unsharded copy,
    gloo's buffers on the CPU):
    - the input embedding and the output head stay whole on every rank, outside FSDP: sharded, they are the
      largest gathers of a forward (V x d each), repeated for every batch;
    - each layer's large children (attention, MLP: any child with >= 1/8 of the layer's parameters) are
      units of their own, so only one of them is gathered at a time.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layer_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    for layer in decoder_layers(model):
        if inference:
            total = sum(p.numel() for p in layer.parameters())
            for child in layer.children():
                if sum(p.numel() for p in child.parameters()) * 8 >= total:
                    fully_shard(child, mp_policy=layer_mp, reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mp_policy=layer_mp, reshard_after_forward=reshard_after_forward)
    ignored = None
    if inference:
        ignored = {p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    # Training: the root unit (embeddings, final norm, output head) stays gathered from its forward to the end of
    # its backward, torch's own default for the root. The fused loss runs inside the root's forward in place of
    # the head (student_head.run_head) and returns no tensor through it, so no pre-backward hook would gather the
    # root again: the head is gathered once per micro-batch and its gradient reduce-scattered at the end of
    # backward with the rest of the root.
    fully_shard(model, mp_policy=root_mp, reshard_after_forward=reshard_after_forward if inference else False,
                ignored_params=ignored)
    return model
