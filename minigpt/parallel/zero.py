"""ZeRO: shard the training state (optimizer state, gradients, parameters) over data-parallel ranks.

Plain data parallelism (chapter 07) keeps a full copy of everything on every rank: with Adam in mixed
precision that is 16 bytes per parameter (2 for the bf16 weights, 2 for their gradients, 12 for the
fp32 master weights and Adam's two moments), so a 13B model needs 208 GB per rank before a single
activation. ZeRO (Rajbhandari et al., 2020) notices that every rank holds the same optimizer state,
gradients and weights, and splits them: each rank keeps 1/N of

- stage 1: the optimizer state (the 12 bytes),
- stage 2: also the gradients,
- stage 3: also the parameters, gathered layer by layer just before they are used.

:func:`fully_shard_gpt` is stage 3 with torch's own tool (FSDP2, ``fully_shard``).

Built in: 08_model_parallel
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from minigpt.model import GPT


def fully_shard_gpt(model: GPT, mesh: DeviceMesh | None = None,
                    reshard_after_forward: bool = True) -> GPT:
    """Shard ``model``'s parameters, gradients and (through them) optimizer state over the ranks of
    the 1-D ``mesh`` with FSDP2: ZeRO stage 3. Each :class:`~minigpt.model.Block` becomes one unit
    whose parameters are all-gathered just before its forward (and again before its backward) and
    whose gradients are reduce-scattered after its backward; the root model is the last unit and holds
    what is left (embeddings, tied with ``lm_head``, and the final LayerNorm). Every parameter becomes
    a ``DTensor`` sharded on dimension 0; an optimizer built afterwards keeps only the local shards'
    state. ``reshard_after_forward=False`` keeps each block's gathered weights from forward to backward
    (ZeRO-2-like communication at more memory). Changes ``model`` in place and returns it. ``mesh``
    defaults to all ranks of the default process group.

    Built in: 08_model_parallel
    """
    if not isinstance(model, GPT):
        raise ValueError(f"model={type(model).__name__} must be a minigpt GPT")
    if not dist.is_initialized():
        raise ValueError("fully_shard_gpt needs an initialised process group (see launch.spawn)")
    if mesh is None:
        device = next(model.parameters()).device.type  # "cpu" with gloo, "cuda" with nccl
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"mesh has {mesh.ndim} dimensions; fully_shard_gpt shards over a 1-D mesh")
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
