"""What each layer of a GPT needs on the wafer: :class:`Stage` (one layer's FLOPs, parameters,
activations and traffic per token, from a workload), the SRAM and FLOPs of a stage for a
:class:`~wafer.target.Target`, and whether a model can fit at all. Placement, weight streaming and
the emulator all start from these stages.

SRAM per PE: inference holds 16-bit weights and the KV cache of one sequence; training holds 16 bytes
per parameter (16-bit weights and gradients, 32-bit master weights and two Adam moments) and one
sequence's activations for the backward pass.

Built in: 11_placement
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wafer.hardware import dtype_bytes
from wafer.shape import kv_width
from wafer.target import Mode, Target, check_mode
from wafer.workload import Workload

TRAINING_BYTES_PER_PARAM = 16  # fp16 weight + fp16 gradient + fp32 master + fp32 Adam m and v


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: a group of a workload's ops that gets one rectangle. Per token of a forward
    pass."""

    name: str
    flops: float  # forward FLOPs per token (every op kind)
    params: int  # parameters it holds
    act_elems: int  # elements it writes per token (kept for the backward pass in training)
    out_elems: int  # elements it sends to the next stage per token
    kv_elems: int = 0  # K and V elements per token of context (attention layers)
    matmul_in: int = 0  # elements its matrix products read per token, summed over the products
    matmul_out: int = 0  # elements they write per token
    products: int = 0  # matrix products one after another (each waits for the one before)


def pipeline_stages(workload: Workload) -> list[Stage]:
    """One stage per layer of ``workload``: the embeddings, each block, and the head.

    The head reads the tied token embedding; on the wafer both the embedding stage and the head
    stage hold a copy of that matrix (an assumption: the lookup and the product sit at opposite
    ends of the pipeline).

    Built in: 11_placement
    """
    out = []
    c = workload.n_embd
    for layer, ops in workload.layers().items():
        name = "embed" if layer < 0 else "head" if layer == workload.n_layer else f"h{layer}"
        out.append(Stage(
            name=name,
            flops=sum(op.flops for op in ops),
            params=sum(op.weight_params + op.reads_params for op in ops),
            act_elems=sum(op.activation_elems for op in ops),
            out_elems=0 if name == "head" else c,
            kv_elems=2 * kv_width(workload.config) if name.startswith("h") else 0,  # K and V, grouped-query
            matmul_in=sum(op.inputs for op in ops),
            matmul_out=sum(op.activation_elems for op in ops if op.kind == "matmul"),
            products=sum(op.kind == "matmul" for op in ops),
        ))
    return out


def stage_bytes(stage: Stage, target: Target) -> int:
    """SRAM a stage needs on ``target`` (see the module's assumptions), in bytes.

    Built in: 11_placement
    """
    b = dtype_bytes(target.dtype)
    if target.mode == "inference":
        return stage.params * b + stage.kv_elems * target.context * b
    return stage.params * TRAINING_BYTES_PER_PARAM + stage.act_elems * target.context * b


def stage_flops(stage: Stage, mode: Mode) -> float:
    """A stage's FLOPs per token in ``mode``: training is 3x the forward (forward and backward)."""
    check_mode(mode)
    return stage.flops * (3.0 if mode == "training" else 1.0)


class DoesNotFit(ValueError):
    """A model needs more SRAM than the wafer has: ``layer`` is where it runs out, ``need`` and
    ``available`` are bytes (``need`` of that layer alone when ``alone``, else up to and including it,
    in whole PEs)."""

    def __init__(self, message: str, layer: str, need: int, available: int, alone: bool):
        super().__init__(message)
        self.layer, self.need, self.available, self.alone = layer, need, available, alone


def check_model_fits(stages: list[Stage], target: Target) -> None:
    """Raise :class:`DoesNotFit` if no placement can hold the model on ``target``: name the layer at
    which SRAM runs out.

    Built in: 11_placement
    """
    wafer, mode = target.wafer, target.mode
    available = wafer.pes * wafer.sram_bytes_per_pe
    need = 0
    for s in stages:
        own = stage_bytes(s, target)
        if own > available:
            raise DoesNotFit(f"layer {s.name} alone needs {own:,} bytes of SRAM in {mode}; the {wafer.name} "
                             f"grid has {available:,}", s.name, own, available, alone=True)
        need += math.ceil(own / wafer.sram_bytes_per_pe) * wafer.sram_bytes_per_pe  # whole PEs
        if need > available:
            raise DoesNotFit(f"the model does not fit in {mode}: up to layer {s.name} it needs {need:,} "
                             f"bytes of SRAM (in whole PEs), and the {wafer.name} grid has {available:,}",
                             s.name, need, available, alone=False)
