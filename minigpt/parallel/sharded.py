"""Sharded training from the command line: ``torchrun -m minigpt train --fsdp`` and
``--tensor-parallel N``.

Chapter 07's Trainer copies the whole model into every process and averages gradients (DDP). This
module lets the same Trainer shard the model instead, with the strategies this chapter builds:

- ``--fsdp``: ZeRO-3 with FSDP2 (:func:`minigpt.parallel.zero.fully_shard_gpt`) over all processes.
  Each process reads its own share of every global batch, as under DDP.
- ``--tensor-parallel N`` on N processes: every block split over them
  (:func:`minigpt.parallel.tensor.tensor_parallel_gpt`). They all read the same batch.
- both, on D x N processes: a 2-D mesh of D data-parallel groups of N tensor-parallel ranks
  (:func:`minigpt.parallel.tensor.dp_tp_gpt`); the N ranks of one group read the same share.

The run computes what one process would with the same global batch: the same mean loss, the same
gradients (summed in another order), the same AdamW step. Its checkpoints are gathered into the
ordinary single-process format (``c_attn``'s rows put back in [q | k | v] order), so that
:func:`minigpt.train.model_from_checkpoint` loads them into a :class:`~minigpt.model.GPT`, and a run
of any layout, one process included, resumes from any other's.

Built in: 08_model_parallel
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from minigpt.distributed import rank_and_world
from minigpt.hardware import pick_device
from minigpt.model import GPT, GPTConfig
from minigpt.parallel.tensor import dp_tp_gpt, qkv_from_tp, qkv_to_tp, tensor_parallel_gpt
from minigpt.parallel.zero import fully_shard_gpt
from minigpt.train import CHECKPOINT, TrainConfig, Trainer


@dataclass(frozen=True)
class ShardPlan:
    """How a run spreads the model over its processes: ``fsdp`` shards parameters, gradients and
    optimizer state over the data-parallel ranks (ZeRO-3); ``tensor_parallel`` splits every block
    over that many ranks. The default (no FSDP, tensor_parallel=1) is no sharding at all.

    Built in: 08_model_parallel
    """

    fsdp: bool = False
    tensor_parallel: int = 1

    def __post_init__(self):
        tp = self.tensor_parallel
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"--tensor-parallel {tp!r} must be a whole number of processes, 1 or more")

    @property
    def active(self) -> bool:
        return self.fsdp or self.tensor_parallel > 1

    @property
    def flags(self) -> str:
        """The plan as command-line flags."""
        tp = f"--tensor-parallel {self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        return " ".join(f for f in ("--fsdp" if self.fsdp else "", tp) if f)

    def check_world(self, world: int) -> None:
        """ValueError unless ``world`` processes can run this plan.

        Built in: 08_model_parallel
        """
        tp = self.tensor_parallel
        if not self.active:
            return
        if world < 2:
            raise ValueError(f"{self.flags} spreads the model over processes, but this is one: start it "
                             f"with torchrun --nproc_per_node=N (N >= 2)")
        if world % tp:
            raise ValueError(f"--tensor-parallel {tp} must divide the number of processes, {world}")
        if not self.fsdp and tp != world:
            raise ValueError(f"--tensor-parallel {tp} on {world} processes would leave {world // tp} whole "
                             f"copies of each shard: start {tp} processes, or add --fsdp for data x tensor")
        if self.fsdp and tp == world:
            raise ValueError(f"--fsdp --tensor-parallel {tp} on {world} processes leaves one data-parallel "
                             f"rank, nothing to shard over: start {2 * tp} processes, or drop --fsdp")

    def check_model(self, config: GPTConfig) -> None:
        """ValueError unless the model's shape splits over ``tensor_parallel`` ranks: whole heads and
        an equal share of the MLP's 4 x n_embd hidden units each.

        Built in: 08_model_parallel
        """
        tp = self.tensor_parallel
        if tp == 1:
            return
        experts = getattr(config, "n_expert", 0)
        if experts:
            raise ValueError(f"--tensor-parallel {tp} splits a dense MLP; this model has n_expert={experts} "
                             f"experts")
        if config.n_head % tp or (4 * config.n_embd) % tp:
            raise ValueError(f"--tensor-parallel {tp} must divide n_head={config.n_head} (each process "
                             f"computes whole heads) and 4 x n_embd={4 * config.n_embd} (the MLP's "
                             f"hidden units)")

    def data_parallel(self, world: int) -> int:
        """How many shares each global batch is cut into: the processes over the tensor-parallel size."""
        return world // self.tensor_parallel

    def mesh(self, world: int, device_type: str = "cpu") -> DeviceMesh:
        """The DeviceMesh of this plan over ``world`` processes: ("dp",) for FSDP, ("tp",) for tensor
        parallelism, ("dp", "tp") for both (rank r is data-parallel rank r // N, tensor rank r % N).
        Needs the process group to be up.

        Built in: 08_model_parallel
        """
        self.check_world(world)
        tp = self.tensor_parallel
        if self.fsdp and tp > 1:
            return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        return init_device_mesh(device_type, (world,), mesh_dim_names=("dp",) if self.fsdp else ("tp",))

    def shard(self, model: GPT, mesh: DeviceMesh) -> GPT:
        """Apply the plan to ``model`` in place (and return it).

        Built in: 08_model_parallel
        """
        self.check_model(model.config)
        if self.fsdp and self.tensor_parallel > 1:
            return dp_tp_gpt(model, mesh)
        if self.fsdp:
            return fully_shard_gpt(model, mesh)
        return tensor_parallel_gpt(model, mesh)

    def __str__(self) -> str:
        parts = (["FSDP"] if self.fsdp else []) + (
            [f"tensor parallel over {self.tensor_parallel}"] if self.tensor_parallel > 1 else [])
        return " x ".join(parts) or "no sharding"


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does in one process, and return the norm before clipping.

    Each rank adds up the squares of the gradient entries it holds, each entry divided by how many
    ranks hold a copy of it: a shard (FSDP, a column or row slice) is held once, a whole tensor (the
    LayerNorms under tensor parallelism, a DTensor replicated over a mesh dimension, a parameter
    whose mesh spans only some of the ranks) by several. One all-reduce of that sum gives every rank
    the squared norm of the whole model's gradient. Every rank must call it.

    Built in: 08_model_parallel
    """
    world = dist.get_world_size()
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        if isinstance(g, DTensor):
            copies = world // g.device_mesh.size()
            for size, placement in zip(g.device_mesh.shape, g.placements):
                if placement.is_partial():  # partial sums: only the whole tensor has a norm
                    total += torch.linalg.vector_norm(g, 2.0).full_tensor().double().square() / world
                    break
                copies *= size if placement.is_replicate() else 1
            else:
                total += g.to_local().double().square().sum() / copies
        else:
            total += g.double().square().sum() / world
    dist.all_reduce(total)
    norm = total.sqrt().float()
    factor = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))  # torch's formula
    for g in grads:
        g.mul_(factor)
    return norm


# -- checkpoints in the single-process format --------------------------------------------------------
def _names(model: torch.nn.Module) -> tuple[dict[str, str], dict[int, str]]:
    """Every parameter name -> the name its state goes by (a tied weight's first name:
    ``lm_head.weight`` -> ``transformer.wte.weight``), and each parameter's (by ``id``) such name."""
    first: dict[int, str] = {}
    alias = {name: first.setdefault(id(p), name)
             for name, p in model.named_parameters(remove_duplicate=False)}
    return alias, first


def _regroup(name: str, t, config: GPTConfig, tp: int, to_tp: bool):
    """``c_attn``'s weight, bias or their optimizer moments between the tensor-parallel row order and
    [q | k | v]; anything else as it is."""
    if tp == 1 or not isinstance(t, torch.Tensor) or t.dim() == 0 or ".attn.c_attn." not in name:
        return t
    return (qkv_to_tp if to_tp else qkv_from_tp)(t, config.n_embd, tp)


def full_state_dicts(model: GPT, optimizer: torch.optim.Optimizer, tensor_parallel: int = 1,
                     ) -> tuple[dict, dict]:
    """The sharded model's and optimizer's state gathered whole, in the format one process's
    ``model.state_dict()`` and ``optimizer.state_dict()`` have: parameter names (tied ones under both
    names), [q | k | v] rows in ``c_attn``, optimizer state keyed by position in the parameter groups.
    Every rank must call it; rank 0 gets the state (on the CPU), the others two empty dicts.

    Built in: 08_model_parallel
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model = get_model_state_dict(model, options=options)
    full_optim: dict[str, Any] = dict(get_optimizer_state_dict(model, optimizer, options=options))
    if not full_model:
        return {}, {}
    (alias, name_of), cfg, tp = _names(model), model.config, tensor_parallel
    out_model = {}
    for key in model.state_dict():
        value = full_model[key] if key in full_model else full_model[alias[key]]
        out_model[key] = _regroup(key, value, cfg, tp, to_tp=False)
    state, groups, index = {}, [], 0
    for group in optimizer.param_groups:
        ids = []
        for p in group["params"]:
            name = name_of[id(p)]
            if name in full_optim["state"]:
                state[index] = {k: _regroup(name, v, cfg, tp, to_tp=False)
                                for k, v in full_optim["state"][name].items()}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return out_model, {"state": state, "param_groups": groups}


def load_full_state_dicts(model: GPT, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict, tensor_parallel: int = 1) -> None:
    """Load single-process state dicts (a checkpoint's ``model`` and ``optimizer``) into a sharded
    model and its optimizer: each rank keeps its own shards. Every rank must call it with the same
    full state.

    Built in: 08_model_parallel
    """
    (alias, name_of), cfg, tp = _names(model), model.config, tensor_parallel
    ours = [p for group in optimizer.param_groups for p in group["params"]]
    theirs = [i for group in optim_state["param_groups"] for i in group["params"]]
    if len(ours) != len(theirs) or len(optimizer.param_groups) != len(optim_state["param_groups"]):
        raise ValueError(f"the checkpoint's optimizer has {len(theirs)} parameters in "
                         f"{len(optim_state['param_groups'])} groups; this model's has {len(ours)} in "
                         f"{len(optimizer.param_groups)}")
    name_at = {i: name_of[id(p)] for i, p in zip(theirs, ours)}
    full_optim: dict[str, Any] = {
        "state": {name_at[i]: {k: _regroup(name_at[i], v, cfg, tp, to_tp=True) for k, v in s.items()}
                  for i, s in optim_state["state"].items()},
        "param_groups": [{**g, "params": [name_at[i] for i in g["params"]]}
                         for g in optim_state["param_groups"]],
    }
    # a tied weight goes in once, under its first name
    full_model = {k: _regroup(k, v, cfg, tp, to_tp=True) for k, v in model_state.items()
                  if alias.get(k, k) == k}
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full_model, options=options)
    set_optimizer_state_dict(model, optimizer, full_optim, options=options)


class ShardedTrainer(Trainer):
    """A :class:`~minigpt.train.Trainer` whose model is sharded by a :class:`ShardPlan` over the
    processes of the running group (torchrun's): FSDP, tensor parallelism or both, in place of DDP.
    Training, evaluation, clipping and checkpoints compute what one process computes on the same
    global batch; ``save`` writes the single-process checkpoint format and ``load`` reads it.

    Built in: 08_model_parallel
    """

    def __init__(self, model: GPT, train_ids, val_ids, config: TrainConfig, plan: ShardPlan,
                 tokenizer=None, out_dir: str | Path | None = None, data_settings: dict | None = None):
        _, world = rank_and_world()
        if type(model) is not GPT:
            raise ValueError(f"a sharded run trains a minigpt GPT, not a {type(model).__name__}")
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(f"a sharded run trains every parameter; frozen here: {', '.join(frozen[:3])}"
                             f"{' ...' if len(frozen) > 3 else ''}")
        if config.compile:
            raise ValueError(f"--compile is not supported with {plan.flags}: drop one of them")
        plan.check_world(world)
        plan.check_model(model.config)
        device = pick_device(config.device)
        model.to(device)
        with torch.no_grad():  # as DDP does: every process starts from rank 0's weights
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, 0)
        self.plan = plan
        self.mesh = plan.mesh(world, device.type)
        plan.shard(model, self.mesh)
        super().__init__(model, train_ids, val_ids, config, tokenizer=tokenizer, out_dir=out_dir,
                         data_settings=data_settings)
        if "dp" in (self.mesh.mesh_dim_names or ()):  # the tensor-parallel ranks of a group share one
            self.data_shard = (self.mesh["dp"].get_local_rank(), self.mesh["dp"].size())
        else:
            self.data_shard = (0, 1)

    def wrap(self, model: GPT) -> torch.nn.Module:
        return model  # the plan has already spread it; FSDP averages the gradients itself

    def clip_gradients(self, max_norm: float) -> None:
        clip_grad_norm_(self.model.parameters(), max_norm)

    def save(self, out_dir: str | Path | None = None) -> Path:
        """As :meth:`Trainer.save`, but not on Ctrl-C: each process stops wherever the interrupt
        finds it, perhaps inside a collective, and gathering the state then could hang; the last
        checkpoint (every ``checkpoint_interval`` steps) stands."""
        if isinstance(sys.exc_info()[1], KeyboardInterrupt):
            return Path(out_dir if out_dir is not None else self.out_dir or ".") / CHECKPOINT
        return super().save(out_dir)

    def state_dicts(self) -> tuple[dict, dict]:
        return full_state_dicts(self.model, self.optimizer, self.plan.tensor_parallel)

    def load_state_dicts(self, model: dict, optimizer: dict) -> None:
        load_full_state_dicts(self.model, self.optimizer, model, optimizer, self.plan.tensor_parallel)
