"""ZeRO: shard the training state (optimizer state, gradients, parameters) over data-parallel ranks.

Plain data parallelism (chapter 07) keeps a full copy of everything on every rank: with Adam in mixed
precision that is 16 bytes per parameter (2 for the bf16 weights, 2 for their gradients, 12 for the
fp32 master weights and Adam's two moments), so a 13B model needs 208 GB per rank before a single
activation. ZeRO (Rajbhandari et al., 2020) notices that every rank holds the same optimizer state,
gradients and weights, and splits them: each rank keeps 1/N of

- stage 1: the optimizer state (the 12 bytes),
- stage 2: also the gradients,
- stage 3: also the parameters, gathered layer by layer just before they are used.

:class:`ShardedAdamW` writes stages 0 (plain replication), 1 and 2 out over flat buffers;
:func:`fully_shard_gpt` is stage 3 with torch's own tool (FSDP2, ``fully_shard``);
:func:`zero_memory_bytes` is the paper's formula, :func:`held_bytes` what a rank really holds and
:class:`CommCounter` what it really sends.

Built in: 08_model_parallel
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from minigpt.model import GPT, GPTConfig
from minigpt.parallel.launch import CollectiveCounter, shard_range


def fully_shard_gpt(model: GPT, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True,
                    mp_policy: MixedPrecisionPolicy | None = None) -> GPT:
    """Shard ``model``'s parameters, gradients and (through them) optimizer state over the ranks of
    the 1-D ``mesh`` with FSDP2: ZeRO stage 3. Each :class:`~minigpt.model.Block` becomes one unit
    whose parameters are all-gathered just before its forward (and again before its backward) and
    whose gradients are reduce-scattered after its backward; the root model is the last unit and holds
    what is left (embeddings, tied with ``lm_head``, and the final LayerNorm). Every parameter becomes
    a ``DTensor`` sharded on dimension 0; an optimizer built afterwards keeps only the local shards'
    state. ``reshard_after_forward=False`` keeps each block's gathered weights from forward to backward
    (ZeRO-2-like communication at more memory). ``mp_policy`` (e.g. ``MixedPrecisionPolicy(
    param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)``) computes and communicates in a lower
    precision while the sharded parameters, which are then the master copy, stay in theirs. Changes
    ``model`` in place and returns it. ``mesh`` defaults to all ranks of the default process group.

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
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model


def zero_memory_bytes(n_params: float, world: int, stage: int, param_bytes: int = 2, grad_bytes: int = 2,
                      state_bytes: int = 12) -> dict[str, float]:
    """Bytes of model state per rank under ZeRO ``stage`` (0: plain data parallelism) over ``world``
    ranks, as the ZeRO paper counts them: ``param_bytes`` and ``grad_bytes`` per parameter for the
    working weights and gradients, ``state_bytes`` (the paper's K) for what the optimizer keeps. Mixed
    precision Adam: 2 + 2 + 12 (fp32 master weights, m and v); plain fp32 Adam: 4 + 4 + 8 (m and v,
    the weights are their own master). Stage s divides the optimizer state (s >= 1), the gradients
    (s >= 2) and the parameters (s = 3) by ``world``. Returns ``params``, ``grads``, ``optimizer`` and
    ``total``.

    Built in: 08_model_parallel
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r} must be 0, 1, 2 or 3")
    if not (isinstance(world, int) and world >= 1):
        raise ValueError(f"world={world!r} must be a positive number of ranks")
    parts = {"params": n_params * param_bytes / (world if stage >= 3 else 1),
             "grads": n_params * grad_bytes / (world if stage >= 2 else 1),
             "optimizer": n_params * state_bytes / (world if stage >= 1 else 1)}
    return {**parts, "total": sum(parts.values())}


def zero_comm_volume(n_params: float, stage: int) -> float:
    """Elements each rank moves per step, in the ZeRO paper's count: an all-reduce is a reduce-scatter
    plus an all-gather, Psi each, so stages 0-2 move 2 Psi (stage 2 reduce-scatters the gradients and
    all-gathers the updated weights: the same two halves); stage 3 all-gathers the weights twice (for
    forward and again for backward) and reduce-scatters the gradients once, 3 Psi. A ring sends
    (N - 1) / N of this volume per rank.

    Built in: 08_model_parallel
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage={stage!r} must be 0, 1, 2 or 3")
    return (3 if stage == 3 else 2) * n_params


class ShardedAdamW:
    """AdamW with ZeRO stage 0, 1 or 2 over the ranks of ``group``, written out.

    The parameters are laid end to end in flat buffers ("buckets" of about ``bucket_numel`` elements,
    in backward order; one bucket by default), each padded to a multiple of the world size N so that
    it splits into N equal chunks; rank r owns chunk r of every bucket. The parameters become views
    into these buffers, so writing a buffer writes the model. What the rank owns (its "shard") is the
    concatenation of its chunks; the optimizer state exists only for the shard:

    - ``master``: fp32 weights of the shard, when the model's weights are in a lower precision
      (mixed precision); otherwise the shard of the weights is its own master;
    - ``exp_avg``, ``exp_avg_sq``: Adam's m and v, shard-sized.

    Stage 0 (N = 1 for the layout, every rank owns everything): all-reduce the gradients, update all.
    Stage 1: the gradients are views into full-size flat buffers; ``step`` reduce-scatters them (a
    rank needs only its own chunk summed: half an all-reduce), updates the own chunk and all-gathers
    the weights (the other half), so it sends what stage 0 sends. Stage 2: a hook on every parameter
    copies its gradient into its bucket's buffer and drops it; when a bucket is complete it is
    reduce-scattered into the shard-sized ``grad_shard`` and freed, so only the bucket being filled is
    ever full size. ``step`` updates and all-gathers. Weight decay applies to matrices and embeddings
    only (``p.dim() >= 2``),
    as :func:`minigpt.train.parameter_groups` does.

    Built in: 08_model_parallel
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], stage: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bucket_numel: int | None = None, group: Any = None,
                 master_dtype: torch.dtype = torch.float32):
        if stage not in (0, 1, 2):
            raise ValueError(f"stage={stage!r} must be 0, 1 or 2 (stage 3 shards the weights: "
                             f"fully_shard_gpt)")
        if not dist.is_initialized():
            raise ValueError("ShardedAdamW needs an initialised process group (see launch.spawn)")
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"lr={lr}, eps={eps} must be positive, weight_decay={weight_decay} >= 0, "
                             f"betas={betas} in [0, 1)")
        if bucket_numel is not None and bucket_numel < 1:
            raise ValueError(f"bucket_numel={bucket_numel} must be positive or None (one bucket)")
        params = list(dict.fromkeys(params))  # a tied weight appears once
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"the parameters have dtypes {dtypes}; ShardedAdamW wants one")
        self.stage, self.lr, self.betas, self.eps, self.weight_decay = stage, lr, betas, eps, weight_decay
        self.group, self.t = group, 0
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        parts = 1 if stage == 0 else self.world  # stage 0: one chunk, owned by every rank
        own = 0 if stage == 0 else self.rank
        dtype = params[0].dtype
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        for p in reversed(params):  # backward produces the last layers' gradients first
            if bucket_numel is not None and self.buckets[-1] and \
                    sum(q.numel() for q in self.buckets[-1]) + p.numel() > bucket_numel:
                self.buckets.append([])
            self.buckets[-1].append(p)
        self.flat: list[torch.Tensor] = []  # each bucket's weights, the parameters are views into it
        self.chunk: list[int] = []  # each bucket's chunk length (padded size / parts)
        decay: list[tuple[int, int]] = []  # shard ranges of matrices and embeddings
        offset = 0  # where this bucket's chunk starts in the shard
        with torch.no_grad():
            for bucket in self.buckets:
                size = sum(p.numel() for p in bucket)
                chunk = -(-size // parts)
                flat = torch.zeros(chunk * parts, dtype=dtype, device=bucket[0].device)
                start = 0
                for p in bucket:
                    flat[start:start + p.numel()].copy_(p.reshape(-1))
                    p.data = flat[start:start + p.numel()].view_as(p)
                    lo, hi = max(start, own * chunk), min(start + p.numel(), (own + 1) * chunk)
                    if p.dim() >= 2 and lo < hi:
                        decay.append((offset + lo - own * chunk, offset + hi - own * chunk))
                    start += p.numel()
                self.flat.append(flat)
                self.chunk.append(chunk)
                offset += chunk
        self.decay = decay
        self.own = own
        mixed = dtype != master_dtype
        mine = [f[own * c:(own + 1) * c] for f, c in zip(self.flat, self.chunk)]
        self.master: torch.Tensor | None = torch.cat(mine).to(master_dtype) if mixed else None
        self.exp_avg = torch.zeros(offset, dtype=master_dtype, device=self.flat[0].device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.peak_grad_bytes = 0  # the most gradient bytes alive at once (stage 2: during backward)
        self.grads: list[torch.Tensor | None] = []  # stages 0/1: full-size gradient buffers
        self.grad_shard: torch.Tensor | None = None  # stage 2: this rank's chunk of the gradients
        if stage < 2:
            for flat, bucket in zip(self.flat, self.buckets):
                g = torch.zeros_like(flat)
                self.grads.append(g)
                start = 0
                for p in bucket:  # autograd accumulates into an existing .grad in place
                    p.grad = g[start:start + p.numel()].view_as(p)
                    start += p.numel()
        else:
            self.grad_shard = torch.zeros(offset, dtype=dtype, device=self.flat[0].device)
            self.grads = [None] * len(self.buckets)
            self._pending = [len(b) for b in self.buckets]
            for b, bucket in enumerate(self.buckets):
                start = 0
                for p in bucket:
                    p.register_post_accumulate_grad_hook(self._hook(b, start))
                    start += p.numel()
        self._track()

    def _hook(self, b: int, start: int):
        def hook(p: torch.Tensor) -> None:
            if self.grads[b] is None:
                self.grads[b] = torch.zeros_like(self.flat[b])
                self._track()
            g = self.grads[b]
            assert g is not None and p.grad is not None
            g[start:start + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None  # the full-size gradient lives only in the bucket until it is reduced
            self._pending[b] -= 1
            if self._pending[b] == 0:
                self._reduce_scatter(b)
        return hook

    def _track(self) -> None:
        live = [g for g in [*self.grads, self.grad_shard] if g is not None]
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(g.numel() * g.element_size() for g in live))

    def _reduce_scatter(self, b: int) -> None:
        g, chunk = self.grads[b], self.chunk[b]
        assert g is not None and self.grad_shard is not None
        out = torch.empty(chunk, dtype=g.dtype, device=g.device)
        dist.reduce_scatter_single(out, g, group=self.group)  # sum of every rank's chunk self.rank
        offset = sum(self.chunk[:b])
        self.grad_shard[offset:offset + chunk].add_(out)  # adds up over accumulation micro-steps
        self.grads[b] = None  # freed
        self._pending[b] = len(self.buckets[b])

    def zero_grad(self) -> None:
        """Set the gradients to zero (stages 0/1: the flat buffers; stage 2: the shard).

        Built in: 08_model_parallel
        """
        for g in self.grads:
            if g is not None:
                g.zero_()
        if self.grad_shard is not None:
            self.grad_shard.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on this rank's shard, then every rank's updated chunk to every rank.

        Built in: 08_model_parallel
        """
        if self.stage < 2:
            for bucket, g in zip(self.buckets, self.grads):
                assert g is not None
                start = 0
                for p in bucket:  # a gradient someone replaced is copied back into the buffer
                    view = g[start:start + p.numel()]
                    if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                        if p.grad is None:
                            view.zero_()
                        else:
                            view.copy_(p.grad.reshape(-1))
                        p.grad = view.view_as(p)
                    start += p.numel()
                if self.stage == 0 and self.world > 1:
                    dist.all_reduce(g, group=self.group)  # the sum; divided below
                elif self.stage == 1 and self.world > 1:  # only the own chunk's sum is needed
                    c = g.numel() // self.world
                    out = torch.empty(c, dtype=g.dtype, device=g.device)
                    dist.reduce_scatter_single(out, g, group=self.group)
                    g[self.own * c:(self.own + 1) * c].copy_(out)
            grad = torch.cat([g[self.own * c:(self.own + 1) * c] for g, c in zip(self.grads, self.chunk)
                              if g is not None])
        else:
            for b, g in enumerate(self.grads):  # a bucket with a parameter that got no gradient
                if g is not None:
                    self._reduce_scatter(b)
            assert self.grad_shard is not None
            grad = self.grad_shard
        grad = grad.to(self.exp_avg.dtype) / self.world  # the mean over ranks of their batches' means
        if self.master is not None:
            weights = self.master
        elif len(self.flat) == 1:  # the own chunk of the one buffer is the shard, updated in place
            weights = self.flat[0][self.own * self.chunk[0]:(self.own + 1) * self.chunk[0]]
        else:
            weights = torch.cat([f[self.own * c:(self.own + 1) * c] for f, c in zip(self.flat, self.chunk)])
        self.t += 1
        beta1, beta2 = self.betas
        for lo, hi in self.decay:  # decoupled weight decay, before the Adam update
            weights[lo:hi].mul_(1 - self.lr * self.weight_decay)
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** self.t)).add_(self.eps)
        weights.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - beta1 ** self.t))
        offset = 0
        for flat, chunk in zip(self.flat, self.chunk):
            mine = flat[self.own * chunk:(self.own + 1) * chunk]
            mine.copy_(weights[offset:offset + chunk])  # into the working precision
            if self.stage >= 1 and self.world > 1:
                dist.all_gather_single(flat, mine.clone(), group=self.group)
            offset += chunk

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this optimizer holds, by kind (for :func:`held_bytes`).

        Built in: 08_model_parallel
        """
        state = [t for t in (self.master, self.exp_avg, self.exp_avg_sq) if t is not None]
        grads = [g for g in self.grads if g is not None]
        return {"grads": grads + ([self.grad_shard] if self.grad_shard is not None else []),
                "optimizer": state}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def held_bytes(model: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes of the storages this rank holds for the model's parameters, their gradients and the
    optimizer's state, each storage counted once (a parameter that is a view into a flat buffer
    counts the whole buffer, padding included; a DTensor counts its local shard's storage, FSDP2's
    padding included). ``optimizer``: a :class:`ShardedAdamW` or a ``torch.optim`` optimizer. Read it
    after backward and before ``zero_grad``, when all three exist. Returns ``params``, ``grads``,
    ``optimizer`` and ``total``.

    Built in: 08_model_parallel
    """
    seen: set[int] = set()

    def size(tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            storage = _local(t).untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes() > 0:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = list(model.parameters())
    out = {"params": size(params), "grads": size(p.grad for p in params if p.grad is not None)}
    if isinstance(optimizer, ShardedAdamW):
        state = optimizer.state_tensors()
        out["grads"] += size(state["grads"])
        out["optimizer"] = size(state["optimizer"])
    else:
        out["optimizer"] = size(v for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor))
    out["total"] = sum(out.values())
    return out


class CommCounter(CollectiveCounter):
    """Counts, while active, the collectives this process issues and their volume in bytes, by what
    the ZeRO paper counts: a reduce-scatter's input, an all-gather's output, twice an all-reduce's
    tensor (a reduce-scatter then an all-gather). It watches the ``c10d`` operators that
    ``torch.distributed`` dispatches, so it sees FSDP2's collectives as well as ours.
    ``volume[name]`` and ``calls[name]`` by operator, ``total`` their sum.

    Built in: 08_model_parallel
    """

    def __init__(self) -> None:
        super().__init__(namespaces=("c10d",))

    @property
    def calls(self) -> dict[str, int]:
        return {name: calls for name, (calls, _) in self.seen.items()}

    @property
    def volume(self) -> dict[str, int]:
        return {name: nbytes * (2 if "allreduce" in name else 1) for name, (_, nbytes) in self.seen.items()}

    @property
    def total(self) -> int:
        """All collectives' volume, in bytes.

        Built in: 08_model_parallel
        """
        return sum(self.volume.values())


def train_zero(rank: int, world: int, stage: int, config: dict, steps: int = 3, precision: str = "fp32",
               batch_size: int = 4, lr: float = 1e-2, weight_decay: float = 0.1, seed: int = 0,
               bucket_numel: int | None = None, mesh: DeviceMesh | None = None) -> dict[str, Any]:
    """Train a GPT of shape ``config`` (``GPTConfig``'s fields) for ``steps`` AdamW steps under ZeRO
    ``stage`` on this rank, for :func:`minigpt.parallel.launch.spawn`. Every rank builds the same
    model from ``seed``; step s uses global batch s (random tokens from seed 1000 + s), of which the
    rank takes its contiguous ``batch_size / world`` rows. A 1-D ``mesh`` trains over its ranks only
    (the rank's place in it and its size replace ``rank`` and ``world``). ``precision``: "fp32",
    "fp64" (weights, gradients and state in that type) or "mixed" (bf16 weights and gradients, fp32
    master weights and moments; stage 3 keeps fp32 shards and computes and communicates in bf16).
    Returns the global loss of every step, the final weights whole (by name), the bytes held
    (:func:`held_bytes`, after the second step's backward) and the bytes communicated in the second
    step (:class:`CommCounter`).

    Built in: 08_model_parallel
    """
    if precision not in ("fp32", "fp64", "mixed"):
        raise ValueError(f"precision={precision!r} must be 'fp32', 'fp64' or 'mixed'")
    group = None
    if mesh is not None:
        rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by world={world}")
    torch.manual_seed(seed)
    cfg = GPTConfig(**config)
    model = GPT(cfg)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "mixed": torch.bfloat16}[precision]
    master = torch.float64 if precision == "fp64" else torch.float32
    optimizer: Any
    if stage == 3:
        model = model.to(master)
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16) if precision == "mixed" else None
        fully_shard_gpt(model, mesh, mp_policy=policy)
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, foreach=True)  # on DTensors: faster than a loop
    else:
        model = model.to(dtype)
        optimizer = ShardedAdamW(model.parameters(), stage, lr=lr, weight_decay=weight_decay,
                                 bucket_numel=bucket_numel, group=group, master_dtype=master)
    mine = shard_range(batch_size, rank, world)
    losses, held, comm = [], {}, {}
    for s in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1),
                               generator=torch.Generator().manual_seed(1000 + s))
        counter = CommCounter()
        with counter:
            _, loss = model(tokens[mine, :-1], tokens[mine, 1:])
            loss.backward()
            if s == 1:
                held = held_bytes(model, optimizer)
            optimizer.step()
        optimizer.zero_grad()
        if s == 1:
            comm = {"total": counter.total, **counter.volume}
        total = loss.detach().double()
        dist.all_reduce(total, group=group)
        losses.append(total.item() / world)
    weights = {n: _local_full(p).detach().clone() for n, p in model.named_parameters()}
    peak = optimizer.peak_grad_bytes if isinstance(optimizer, ShardedAdamW) else held["grads"]
    return {"losses": losses, "weights": weights, "held": held, "comm": comm, "peak_grad_bytes": peak,
            "n_params": sum(p.numel() for p in model.parameters())}


def _local_full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (FSDP2), or the tensor itself."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def train_zero_stages(rank: int, world: int, config: dict, batch_size: int = 4,
                      stages: tuple[int, ...] = (0, 1, 2, 3), precisions: tuple[str, ...] = ("fp64", "mixed"),
                      sizes: tuple[int, ...] | None = None,
                      bucket_numel: int | None = None) -> dict[str, Any]:
    """:func:`train_zero` for every stage, precision and group size in one group of processes
    (starting processes costs seconds), keyed ``"<precision>-<stage>@<size>"``. For a size n smaller
    than ``world`` the ranks split into ``world / n`` groups of n consecutive ranks that each train the
    same model (a 2-D mesh's rows); ``sizes`` defaults to ``(world,)``. ``bucket_numel`` goes to
    :class:`ShardedAdamW`.

    Built in: 08_model_parallel
    """
    out = {}
    for n in sizes or (world,):
        if n < 1 or world % n:
            raise ValueError(f"size {n} must divide world={world}")
        mesh = init_device_mesh("cpu", (world // n, n), mesh_dim_names=("replica", "shard"))["shard"]
        for p in precisions:
            for s in stages:
                out[f"{p}-{s}@{n}"] = train_zero(rank, world, s, config, precision=p,
                                                 batch_size=batch_size, mesh=mesh,
                                                 bucket_numel=bucket_numel)
    return out
