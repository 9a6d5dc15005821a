"""Which parallelism for which model on which cluster: every combination of data, tensor and pipeline
parallelism (with a ZeRO stage, a micro-batch size and activation recomputation) for a GPT on a
cluster of GPUs, the memory each GPU needs, and how long a training step takes.

The model, each assumption stated once.

Memory per GPU, in bytes, on the busiest pipeline stage:

- **model state**: the stage's parameters (its ``ceil(L / p)`` blocks and, on the first stage, the
  embeddings and the final LayerNorm), all split over the ``t`` tensor ranks, at 2 + 2 + 12 bytes per
  parameter (16-bit weights and gradients; fp32 master weights and Adam's two moments). ZeRO shards
  over the ``d`` data-parallel ranks the optimizer state (stage 1), the gradients too (stage 2) and
  the weights too (stage 3): 16, 4 + 12/d, 2 + 14/d and 16/d bytes per parameter (Rajbhandari et al.
  2020, arXiv:1910.02054). ZeRO-3 also holds two blocks' gathered weights (the one it computes with
  and the next, prefetched).
- **activations** of one layer for one micro-batch of ``b`` sequences of ``s`` tokens, width ``h``
  and ``a`` heads, kept for the backward pass: ``s b h (34 + 5 a s / h) / t`` (Korthikanti et al.
  2022, arXiv:2205.05198, with tensor *and sequence* parallelism, so that the LayerNorms' and
  dropouts' activations are split too); with full recomputation only each layer's input, ``2 s b h``,
  plus one layer's full activations while it is recomputed. The first stage of a 1F1B pipeline holds
  ``min(p, m)`` micro-batches in flight; the last holds one, and the fp32 logits ``4 s b V / t``.

Time per step, for a global batch of ``batch_tokens`` tokens:

- **compute**: the slowest stage's FLOPs (chapter 03's count: three times a forward pass, attention's
  full T x T and the head included, plus one more forward of the blocks with recomputation) at
  ``efficiency`` x the GPU's peak;
- **tensor parallel**: per block and micro-batch, two all-reduces of ``2 s b h`` bytes forward and two
  backward (two more when the forward is recomputed), on NVLink: tensor parallelism stays in a node;
- **pipeline**: per micro-batch, an activation sent forward and its gradient sent back, each ``2 s b h``
  bytes; a step is ``m + p - 1`` micro-batch slots, so the bubble is ``(p - 1) / (m + p - 1)``;
- **data parallel**, on InfiniBand as soon as the cluster spans nodes, each collective a ring (an
  all-gather or a reduce-scatter is half an all-reduce). ZeRO-0 and -1 keep whole gradients and
  accumulate them over the micro-batches, then all-reduce them once (ZeRO-1 as a reduce-scatter and
  an all-gather of the updated weights: the same bytes). ZeRO-2 keeps only its shard of the
  gradients, so it reduce-scatters them after every micro-batch, and all-gathers the updated weights
  once. ZeRO-3 also all-gathers each block's weights for every micro-batch's forward and again for
  its backward (a recomputed forward runs inside the backward's gather);
- every message costs chapter 07's alpha + bytes / beta (:class:`minigpt.distributed.LinkModel`);
  nothing overlaps (a pessimistic bound: real schedules hide some communication behind compute); the
  optimizer's update is left out.

Built in: 08_model_parallel
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minigpt.checks import positive_int
from minigpt.distributed import LinkModel
from minigpt.model import GPTConfig


@dataclass(frozen=True)
class Cluster:
    """A GPU cluster: identical GPUs in nodes of ``gpus_per_node`` joined by NVLink, the nodes joined
    by a network; each link as alpha (seconds per message) and beta (bytes per second, per GPU, one
    direction).

    Built in: 08_model_parallel
    """

    name: str
    peak_flops: float  # dense 16-bit FLOP/s per GPU
    memory_bytes: float  # HBM per GPU
    gpus_per_node: int
    nvlink: LinkModel  # within a node
    network: LinkModel  # between nodes

    def __post_init__(self):
        positive_int("gpus_per_node", self.gpus_per_node)
        if not (self.peak_flops > 0 and self.memory_bytes > 0):
            raise ValueError(f"peak_flops={self.peak_flops!r} and memory_bytes={self.memory_bytes!r} "
                             f"must be positive")


NVLINK_ALPHA_S = 3e-6  # A: no figure cited; a few microseconds per message, NCCL's order of magnitude
NETWORK_ALPHA_S = 5e-6  # A: likewise, a little more across a switch

H100 = Cluster(
    name="H100 SXM 80 GB",
    peak_flops=989e12,  # S: NVIDIA H100 datasheet, BF16 dense (1,979 with 2:4 sparsity); as wafer.hardware
    memory_bytes=80e9,  # S: datasheet, 80 GB HBM3
    gpus_per_node=8,  # P: a DGX/HGX H100 node holds 8 GPUs on NVSwitch
    nvlink=LinkModel(alpha=NVLINK_ALPHA_S, beta=450e9),  # S: NVLink 4, 900 GB/s per GPU both ways together
    network=LinkModel(alpha=NETWORK_ALPHA_S, beta=50e9),  # S: one 400 Gb/s NDR InfiniBand NIC per GPU
    # (DGX H100: 8 ConnectX-7 per node); 400e9 / 8 = 50e9 bytes per second
)

A100 = Cluster(
    name="A100 SXM 80 GB",
    peak_flops=312e12,  # S: NVIDIA A100 datasheet, BF16 dense; P: the peak Narayanan et al. (2021) divide by
    memory_bytes=80e9,  # P: Narayanan et al. 2021 (arXiv:2104.04473), section 5: Selene's 80 GB A100s
    gpus_per_node=8,  # P: ibid., DGX A100 nodes of 8
    nvlink=LinkModel(alpha=NVLINK_ALPHA_S, beta=300e9),  # S: NVLink 3, 600 GB/s per GPU both ways together
    network=LinkModel(alpha=NETWORK_ALPHA_S, beta=25e9),  # P: ibid., 8 x 200 Gb/s HDR InfiniBand per node
)

EFFICIENCY = 0.6  # A: the fraction of peak that the matrix products reach; large runs report 40-55% of
# peak end to end (Narayanan et al. 2021, Table 1: 44-52%), communication and bubble included

# Three models: GPT-2 small (chapter 03's default), Cerebras-GPT 13B (Dey et al. 2023, arXiv:2304.03208)
# and GPT-3 175B (Brown et al. 2020, arXiv:2005.14165, Table 2.1: 96 layers, 96 heads, d 12288, 2048 tokens)
GPT2_SMALL = GPTConfig()
CEREBRAS_GPT_13B = GPTConfig(n_layer=40, n_head=40, n_embd=5120, block_size=2048, vocab_size=50257)
GPT3_175B = GPTConfig(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257)
MODELS = {"GPT-2 small": GPT2_SMALL, "Cerebras-GPT 13B": CEREBRAS_GPT_13B, "GPT-3 175B": GPT3_175B}

BYTES_WEIGHT, BYTES_GRAD, BYTES_OPTIMIZER = 2, 2, 12  # 16-bit weights and gradients; fp32 master, m, v


# --- counts ---------------------------------------------------------------------------------------------

def block_parameters(config: GPTConfig) -> int:
    """Parameters of one block: 12 C^2 in the four matrices, 9 C of biases and 4 C of LayerNorm (2 C
    of LayerNorm weights alone without biases).

    Built in: 08_model_parallel
    """
    c = config.n_embd
    return 12 * c * c + (13 * c if config.bias else 2 * c)


def parameter_count(config: GPTConfig) -> int:
    """Every parameter of ``GPT(config)``, counted from the shape (the tied head counted once), so that
    a 175B model is counted without being built.

    Built in: 08_model_parallel
    """
    c = config.n_embd
    final_norm = 2 * c if config.bias else c
    embeddings = (config.vocab_size + config.block_size) * c
    return config.n_layer * block_parameters(config) + embeddings + final_norm


def model_state_bytes(params: float, zero: int, data: int) -> float:
    """Bytes of weights, gradients and optimizer state for ``params`` parameters on one GPU under ZeRO
    stage ``zero`` (0 to 3) over ``data`` data-parallel ranks, at 2 + 2 + 12 bytes per parameter.

    Built in: 08_model_parallel
    """
    positive_int("data", data)
    w, g, o = BYTES_WEIGHT, BYTES_GRAD, BYTES_OPTIMIZER
    per_param = {0: w + g + o, 1: w + g + o / data, 2: w + (g + o) / data, 3: (w + g + o) / data}
    if zero not in per_param:
        raise ValueError(f"zero={zero!r} must be a ZeRO stage 0, 1, 2 or 3")
    return per_param[zero] * params


def layer_activation_bytes(config: GPTConfig, micro_batch: int, tensor: int = 1, recompute: bool = False,
                           context: int | None = None) -> float:
    """Bytes one block keeps for the backward pass for ``micro_batch`` sequences: Korthikanti et al.'s
    ``s b h (34 + 5 a s / h) / t`` (16-bit activations, one-byte dropout masks, the attention scores
    and their softmax kept), or ``2 s b h`` (the block's input alone) with full recomputation.

    Built in: 08_model_parallel
    """
    s, b, h, a = context or config.block_size, micro_batch, config.n_embd, config.n_head
    if recompute:
        return 2.0 * s * b * h
    return s * b * h * (34 + 5 * a * s / h) / tensor


def block_forward_flops(config: GPTConfig) -> float:
    """Forward FLOPs of one block per token: 24 C^2 for the matrices and 4 T C for the scores and the
    weighted sum (chapter 03's count).

    Built in: 08_model_parallel
    """
    c, t = config.n_embd, config.block_size
    return 24.0 * c * c + 4.0 * t * c


def training_flops_per_token(config: GPTConfig, recompute: bool = False) -> float:
    """FLOPs a training step does per token: three forward passes' worth (chapter 03), and one more
    forward pass of the blocks when their activations are recomputed (the head is not).

    Built in: 08_model_parallel
    """
    blocks = config.n_layer * block_forward_flops(config)
    head = 2.0 * config.n_embd * config.vocab_size
    return 3.0 * (blocks + head) + (blocks if recompute else 0.0)


# --- one plan --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """One way to train: ``data`` x ``tensor`` x ``pipeline`` GPUs, a ZeRO stage, ``micro_batch``
    sequences per micro-batch and ``micro_batches`` of them per step on each replica, with or without
    recomputation. Bytes are per GPU on the busiest stage; seconds are per step.

    Built in: 08_model_parallel
    """

    data: int
    tensor: int
    pipeline: int
    zero: int
    micro_batch: int
    recompute: bool
    micro_batches: int
    params_per_gpu: float
    state_bytes: float  # weights, gradients, optimizer state (ZeRO-sharded)
    buffer_bytes: float  # ZeRO-3's gathered weights
    activation_bytes: float
    memory_bytes: float  # the sum
    fits: bool
    compute_s: float  # every micro-batch's compute on the slowest stage
    tensor_s: float  # tensor-parallel all-reduces
    pipeline_s: float  # activations and their gradients between stages
    bubble_s: float  # the p - 1 idle slots of the pipeline
    data_s: float  # gradient reduction (and ZeRO-3's gathers)
    step_s: float
    bubble: float  # (p - 1) / (m + p - 1)
    model_flops: float  # FLOP/s per GPU, recomputation not counted (MFU's numerator)
    hardware_flops: float  # FLOP/s per GPU that the GPUs do, recomputation counted (Megatron's count)
    mfu: float

    @property
    def gpus(self) -> int:
        return self.data * self.tensor * self.pipeline

    def __str__(self) -> str:
        return (f"d{self.data} x t{self.tensor} x p{self.pipeline}, ZeRO-{self.zero}, b={self.micro_batch}, "
                f"{'recompute' if self.recompute else 'no recompute'}: {self.memory_bytes / 1e9:.1f} GB, "
                f"{self.step_s:.3g} s")


def _check(config: GPTConfig, gpus: int, batch_tokens: int, cluster: Cluster, efficiency: float) -> int:
    """The global batch in sequences, after checking every input."""
    if not isinstance(config, GPTConfig):
        raise ValueError(f"config={config!r} must be a GPTConfig")
    if not isinstance(cluster, Cluster):
        raise ValueError(f"cluster={cluster!r} must be a Cluster (H100, A100, or one of your own)")
    positive_int("gpus", gpus)
    positive_int("batch_tokens", batch_tokens)
    node = cluster.gpus_per_node
    if gpus > node and gpus % node:
        raise ValueError(f"gpus={gpus} must fill whole nodes of {node} (or be at most {node})")
    if batch_tokens % config.block_size:
        raise ValueError(f"batch_tokens={batch_tokens} must be a whole number of {config.block_size}-token "
                         f"sequences")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency={efficiency!r} must be in (0, 1]")
    return batch_tokens // config.block_size


def plan(config: GPTConfig, gpus: int, batch_tokens: int, tensor: int, pipeline: int, zero: int = 0,
         micro_batch: int = 1, recompute: bool = False, cluster: Cluster = H100,
         efficiency: float = EFFICIENCY) -> Plan:
    """The memory and step time of one combination: ``tensor`` x ``pipeline`` x ``data`` = ``gpus``.

    Built in: 08_model_parallel
    """
    sequences = _check(config, gpus, batch_tokens, cluster, efficiency)
    t, p = positive_int("tensor", tensor), positive_int("pipeline", pipeline)
    b = positive_int("micro_batch", micro_batch)
    node = cluster.gpus_per_node
    if node % t or config.n_head % t:
        raise ValueError(f"tensor={t} must divide the {node} GPUs of a node (tensor parallelism stays in "
                         f"NVLink's reach) and n_head={config.n_head}")
    if gpus % (t * p):
        raise ValueError(f"tensor x pipeline = {t} x {p} must divide gpus={gpus}")
    if p > config.n_layer:
        raise ValueError(f"pipeline={p} stages for n_layer={config.n_layer} blocks: at most one a block")
    d = gpus // (t * p)
    if sequences % (d * b):
        raise ValueError(f"the batch of {sequences} sequences does not split into {d} replicas x "
                         f"micro-batches of {b}")
    m = sequences // (d * b)
    s, h, v, L = config.block_size, config.n_embd, config.vocab_size, config.n_layer
    layers = math.ceil(L / p)  # on the busiest stage
    # memory
    per_block = block_parameters(config) / t
    params = layers * per_block + (parameter_count(config) - L * block_parameters(config)) / t
    state = model_state_bytes(params, zero, d)
    buffer = 2 * BYTES_WEIGHT * per_block if zero == 3 and d > 1 else 0.0
    kept = layer_activation_bytes(config, b, t, recompute)
    working = layer_activation_bytes(config, b, t, False) if recompute else 0.0  # the layer recomputed
    logits = 4.0 * s * b * v / t
    first = min(p, m) * layers * kept + working
    last = layers * kept + working + logits
    activations = max(first, last) if p > 1 else last
    memory = state + buffer + activations
    # time per micro-batch on the slowest stage (its blocks, and the head on the last)
    rate = cluster.peak_flops * efficiency
    tokens = s * b
    stage_flops = layers * block_forward_flops(config) * (4 if recompute else 3) + 3 * 2.0 * h * v
    compute = stage_flops * tokens / t / rate
    msg = 2.0 * s * b * h  # one micro-batch's activations, 16-bit
    tp = layers * (6 if recompute else 4) * cluster.nvlink.ring_allreduce(msg, t)
    between = cluster.network if t * p > node else cluster.nvlink
    pp = 2 * between.message(msg) if p > 1 else 0.0
    slot = compute + tp + pp
    dp_link = cluster.network if gpus > node else cluster.nvlink
    grads = BYTES_GRAD * params
    half = dp_link.ring_allreduce(grads, d) / 2  # a reduce-scatter, or an all-gather of the (16-bit) weights
    data_s = {0: 2 * half, 1: 2 * half, 2: m * half + half, 3: m * 3 * half}[zero]
    step = (m + p - 1) * slot + data_s
    done = training_flops_per_token(config, recompute) * sequences * s / gpus
    useful = training_flops_per_token(config, False) * sequences * s / gpus
    return Plan(data=d, tensor=t, pipeline=p, zero=zero, micro_batch=b, recompute=recompute, micro_batches=m,
                params_per_gpu=params, state_bytes=state, buffer_bytes=buffer, activation_bytes=activations,
                memory_bytes=memory, fits=memory <= cluster.memory_bytes, compute_s=m * compute,
                tensor_s=m * tp, pipeline_s=m * pp, bubble_s=(p - 1) * slot, data_s=data_s, step_s=step,
                bubble=(p - 1) / (m + p - 1), model_flops=useful / step, hardware_flops=done / step,
                mfu=useful / step / cluster.peak_flops)


# --- every plan, and the best -------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def plans(config: GPTConfig, gpus: int, batch_tokens: int, cluster: Cluster = H100,
          efficiency: float = EFFICIENCY, zero_stages: tuple[int, ...] = (0, 1, 2, 3),
          max_micro_batch: int = 64) -> list[Plan]:
    """Every combination for ``config`` on ``gpus`` GPUs of ``cluster``: tensor sizes that divide a node
    and the heads, pipeline depths up to one block per stage, data parallelism for the rest, each ZeRO
    stage of ``zero_stages``, micro-batches of powers of two (up to ``max_micro_batch``) that divide a
    replica's share of the batch, recomputation off and on. Those that do not fit are kept, with
    ``fits=False``, so that a figure can show them.

    Built in: 08_model_parallel
    """
    sequences = _check(config, gpus, batch_tokens, cluster, efficiency)
    positive_int("max_micro_batch", max_micro_batch)
    for z in zero_stages:
        if z not in (0, 1, 2, 3):
            raise ValueError(f"zero_stages={zero_stages!r}: each must be 0, 1, 2 or 3")
    out = []
    for t in _divisors(cluster.gpus_per_node):
        if gpus % t or config.n_head % t:
            continue
        for p in _divisors(gpus // t):
            d = gpus // (t * p)
            if p > config.n_layer or sequences % d:
                continue
            sizes = [2**k for k in range(8) if 2**k <= max_micro_batch and (sequences // d) % 2**k == 0]
            for z in zero_stages:
                for b in sizes:
                    for r in (False, True):
                        out.append(plan(config, gpus, batch_tokens, t, p, z, b, r, cluster, efficiency))
    return out


def best_plan(config: GPTConfig, gpus: int, batch_tokens: int, cluster: Cluster = H100,
              efficiency: float = EFFICIENCY, **options) -> Plan:
    """The fastest plan that fits in the GPUs' memory (the smaller memory breaks a tie); a ValueError
    naming the smallest memory any plan needs if none fits. ``options`` go to :func:`plans`.

    Built in: 08_model_parallel
    """
    candidates = plans(config, gpus, batch_tokens, cluster, efficiency, **options)
    if not candidates:
        raise ValueError(f"no combination of tensor, pipeline and data parallelism splits {gpus} GPUs and "
                         f"{batch_tokens // config.block_size} sequences for this model")
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        least = min(candidates, key=lambda c: c.memory_bytes)
        raise ValueError(f"no plan fits in {cluster.memory_bytes / 1e9:.0f} GB per GPU on {gpus} GPUs: the "
                         f"smallest needs {least.memory_bytes / 1e9:.1f} GB ({least})")
    return min(fitting, key=lambda c: (c.step_s, c.memory_bytes))
