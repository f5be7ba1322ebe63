"""FSDP2 sharding (--fsdp under torchrun), imported only when a run shards: the rest runs on a PyTorch without FSDP2."""

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict as dcp
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from common.errors import fail

WHOLE = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # every rank sends its shards; rank 0 gets all


def fully_shard_layers(model, dtype: str):
    """FSDP2 (`fully_shard`) splits the weights, gradients and AdamW's moments over the ranks. Each decoder layer is a
    unit, the root holds the rest (embeddings, final norm, output layer); a unit's full weights are gathered for its
    forward and backward only, and the backward's reduce-scatter leaves each rank its shard's mean gradient. Shards stay
    float32 (as loaded); --dtype bfloat16 computes in bfloat16, reduces in float32. One process: unchanged."""
    kinds = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        fail(f"--fsdp: found no decoder layers in {type(model).__name__} (none of the classes its _no_split_modules"
             " names), so it cannot be sharded per layer")  # fmt: skip
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    mesh = dist.device_mesh.init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if dtype == "bfloat16" else MixedPrecisionPolicy()
    for unit in [*layers, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return model


def whole_state_dicts(model, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's full state dicts, gathered from the shards onto rank 0 (each tied weight
    once, under the name the model's own state_dict gives it)."""
    weights = dcp.get_model_state_dict(model, options=WHOLE)
    own = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    return {k: w for k, w in weights.items() if k in own}, dcp.get_optimizer_state_dict(model, optimizer, options=WHOLE)


def load_optimizer_state(model, optimizer, state: dict):
    """A full optimizer state dict (as a checkpoint holds it) put back into a sharded optimizer: each rank its shard."""
    dcp.set_optimizer_state_dict(model, optimizer, state, options=dcp.StateDictOptions(full_state_dict=True))
