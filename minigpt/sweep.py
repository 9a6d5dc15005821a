"""Many GPTs of one shape trained at once: each weight stacked along a leading "member" dimension, the
forward pass written with batched matrix products, and AdamW written out with a learning rate, a
schedule, a weight decay, a clip and a length for each member. A learning-rate sweep over eight rates
and three seeds is then one run of 24 members instead of 24 runs.

Each member is the run that :class:`minigpt.train.Trainer` would make alone from the same initial
weights, data seed and settings, with ``bf16="off"``: members compute in their models' own dtype,
without autocast (equal to rounding; ``tests/test_sweep.py`` checks it in float32 and
float64).

Built in: 06_scaling
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from minigpt.model import GPT, GPTConfig, require_gpt2
from minigpt.train import TokenWindows, TrainConfig, Trainer, learning_rate, parameter_groups


def _names(config: GPTConfig) -> set[str]:
    """The parameter names that :func:`stacked_loss` knows how to use, for this config."""
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"}
    linear = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    for i in range(config.n_layer):
        names |= {f"transformer.h.{i}.{m}.weight" for m in (*linear, "ln_1", "ln_2")}
        if config.bias:
            names |= {f"transformer.h.{i}.{m}.bias" for m in (*linear, "ln_1", "ln_2")}
    if config.bias:
        names.add("transformer.ln_f.bias")
    return names


def stack_parameters(models: list[GPT]) -> dict[str, torch.Tensor]:
    """Name -> a (members, ...) tensor of the models' parameters (the tied head counted once), as
    fresh leaf tensors that require gradients.

    Built in: 06_scaling
    """
    if not models:
        raise ValueError("need at least one model")
    config = models[0].config
    if any(m.config != config for m in models):
        raise ValueError("every member must have the same GPTConfig")
    require_gpt2(config, "the stacked models")
    if config.dropout != 0.0:
        raise ValueError(f"dropout={config.dropout}: the stacked models support dropout=0.0 only")
    per_model = [dict(m.named_parameters()) for m in models]
    if set(per_model[0]) != _names(config):
        unknown = sorted(set(per_model[0]) ^ _names(config))
        raise ValueError(f"the stacked forward pass does not know the parameters {unknown}")
    return {name: torch.stack([params[name].detach() for params in per_model]).requires_grad_()
            for name in per_model[0]}


def _linear(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x (K, B, T, in) times each member's (out, in) weight, plus its bias: (K, B, T, out)."""
    w, b = p[name + ".weight"], p.get(name + ".bias")
    k, *rest, n_in = x.shape
    flat = x.reshape(k, -1, n_in)
    wt = w.transpose(1, 2)
    out = torch.bmm(flat, wt) if b is None else torch.baddbmm(b[:, None, :], flat, wt)
    return out.view(k, *rest, w.shape[1])


def _layer_norm(x: torch.Tensor, p: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * p[name + ".weight"][:, None, None, :]
    bias = p.get(name + ".bias")
    return y if bias is None else y + bias[:, None, None, :]


def stacked_loss(config: GPTConfig, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 ) -> torch.Tensor:
    """Each member's mean cross-entropy on its own batch: ``p`` from :func:`stack_parameters`, x and y
    (K, B, T) token ids and targets; returns (K,). The same arithmetic as :meth:`GPT.forward`, with
    every matrix product batched over the K members.

    Built in: 06_scaling
    """
    k, b, t = x.shape
    if t > config.block_size:
        raise ValueError(f"T={t} exceeds block_size={config.block_size}")
    members = torch.arange(k, device=x.device)[:, None, None]
    h = p["transformer.wte.weight"][members, x] + p["transformer.wpe.weight"][:, None, :t]  # (K, B, T, C)
    if config.mup and config.mup_input_mult != 1.0:
        h = h * config.mup_input_mult
    heads, size, eps = config.n_head, config.head_dim, config.layer_norm_epsilon
    scale = config.attention_scale if config.mup else None
    for i in range(config.n_layer):
        block = f"transformer.h.{i}."
        q, kk, v = _linear(_layer_norm(h, p, block + "ln_1", eps), p, block + "attn.c_attn").split(
            config.n_embd, dim=-1)
        q, kk, v = (z.reshape(k * b, t, heads, size).transpose(1, 2) for z in (q, kk, v))
        a = F.scaled_dot_product_attention(q, kk, v, is_causal=True, scale=scale)  # (K B, H, T, hd)
        h = h + _linear(a.transpose(1, 2).reshape(k, b, t, config.n_embd), p, block + "attn.c_proj")
        hidden = F.gelu(_linear(_layer_norm(h, p, block + "ln_2", eps), p, block + "mlp.c_fc"),
                        approximate="tanh")
        h = h + _linear(hidden, p, block + "mlp.c_proj")
    h = _layer_norm(h, p, "transformer.ln_f", eps)
    logits = torch.bmm(h.reshape(k, b * t, -1), p["transformer.wte.weight"].transpose(1, 2))  # tied head
    if config.mup:
        logits = logits * (config.mup_output_mult / config.width_mult)
    losses = F.cross_entropy(logits.reshape(k * b * t, -1).float(), y.reshape(-1), reduction="none")
    return losses.view(k, b * t).mean(1)


def train_stacked(models: list[GPT], train_ids: torch.Tensor, configs: list[TrainConfig],
                  record_every: int = 0) -> list[dict[str, float]]:
    """Train the same-shaped ``models`` together, member i as ``Trainer(models[i], train_ids, ...,
    configs[i]).train()`` would alone: its own peak and floor learning rate, warmup, ``max_steps``,
    weight decay, betas, clip and data seed. Every member needs the same ``batch_size`` (the batches
    are stacked) and ``grad_accum=1``. A member that reaches its ``max_steps`` is copied back into its
    model and leaves the stack, so members of different lengths cost what they would alone.

    Returns, if ``record_every`` > 0, each training member's loss and gradient norm (before any clip)
    every that many steps, as a list of ``{"step", "member", "loss", "grad_norm"}``; otherwise [].

    Built in: 06_scaling
    """
    k = len(models)
    if len(configs) != k:
        raise ValueError(f"{len(configs)} training configs for {k} models")
    batch = configs[0].batch_size
    if any(c.batch_size != batch for c in configs):
        seen = sorted({c.batch_size for c in configs})
        raise ValueError(f"every member needs the same batch_size; got {seen}")
    if any(c.grad_accum != 1 for c in configs):
        raise ValueError("train_stacked supports grad_accum=1 only")
    if any(c.bf16 == "on" for c in configs):
        raise ValueError("train_stacked computes in the models' own dtype, without autocast: "
                         "bf16='on' is not supported (use 'off')")
    config = models[0].config
    stacked = stack_parameters(models)
    # one (K, P) tensor holds every member's parameters as a row, and each named parameter is a view
    # of its columns: the optimizer is then a few operations on (K, P), whatever the number of matrices
    names = list(stacked)
    sizes = [stacked[name][0].numel() for name in names]
    flat = torch.cat([stacked[name].detach().flatten(1) for name in names], dim=1).requires_grad_()
    # each parameter's factor on the rate (muP) and whether it decays, from the Trainer's own groups
    group_of = {id(p): group for group in parameter_groups(models[0], 1.0) for p in group["params"]}
    groups = [group_of[id(p)] for p in dict(models[0].named_parameters()).values()]

    def columns(key):  # one number per parameter, repeated over that parameter's columns
        return torch.cat([torch.full((n,), group[key], dtype=flat.dtype, device=flat.device)
                          for group, n in zip(groups, sizes)])

    column_scale, column_decays = columns("lr_scale"), columns("weight_decay")
    shapes = [stacked[name].shape for name in names]
    data = TokenWindows(train_ids, config.block_size, "the training split")
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)

    def column(values):  # one number per member, as a (K, 1) column
        return torch.tensor(values, dtype=flat.dtype, device=flat.device)[:, None]

    beta1, beta2 = column([c.beta1 for c in configs]), column([c.beta2 for c in configs])
    clip, decay = column([c.grad_clip for c in configs]), column([c.weight_decay for c in configs])
    active = list(range(k))  # the members still training: row j of flat is member active[j]
    history: list[dict[str, float]] = []
    for step in range(max(c.max_steps for c in configs)):
        xs, ys = zip(*(data.batch(batch, generators[i], flat.device) for i in active))
        p = dict(zip(names, (w.view(-1, *shape[1:]) for w, shape in zip(flat.split(sizes, dim=1), shapes))))
        losses = stacked_loss(config, p, torch.stack(xs), torch.stack(ys))
        (g,) = torch.autograd.grad(losses.sum(), [flat])
        with torch.no_grad():
            norms = g.square().sum(1, keepdim=True).sqrt()  # each member's norm, as clip_grad_norm_ has it
            if record_every and (step + 1) % record_every == 0:
                history += [{"step": step + 1, "member": i, "loss": loss, "grad_norm": norm}
                            for i, loss, norm in zip(active, losses.tolist(), norms.flatten().tolist())]
            g = g * torch.where(clip > 0, (clip / (norms + 1e-6)).clamp(max=1.0), 1.0)
            rate, t = column([learning_rate(step, configs[i]) for i in active]) * column_scale, step + 1
            flat.mul_(1 - rate * decay * column_decays)
            m.mul_(beta1).add_((1 - beta1) * g)
            v.mul_(beta2).add_((1 - beta2) * g * g)
            flat.sub_(rate / (1 - beta1**t) * m / ((v / (1 - beta2**t)).sqrt() + 1e-8))
            done = [j for j, i in enumerate(active) if configs[i].max_steps == step + 1]
            if done:  # copy the finished members out, and train the rest without them
                for j in done:
                    rows = dict(zip(names, flat[j].split(sizes)))
                    for name, w in models[active[j]].named_parameters():
                        w.copy_(rows[name].view_as(w))
                keep = [j for j in range(len(active)) if j not in done]
                active = [active[j] for j in keep]
                flat = flat[keep].detach().requires_grad_()
                m, v, beta1, beta2, clip, decay = (z[keep] for z in (m, v, beta1, beta2, clip, decay))
    return history


def train_members(config: GPTConfig, train_ids: torch.Tensor, configs: list[TrainConfig],
                  init_seeds: list[int]) -> list[GPT]:
    """Build member i as ``torch.manual_seed(init_seeds[i]); GPT(config)``, train all of them with
    :func:`train_stacked`, and return them in eval mode.

    Built in: 06_scaling
    """
    if len(init_seeds) != len(configs):
        raise ValueError(f"{len(init_seeds)} initial seeds for {len(configs)} training configs")
    models = []
    for seed in init_seeds:
        torch.manual_seed(seed)
        models.append(GPT(config))
    train_stacked(models, train_ids, configs)
    return [m.eval() for m in models]


# -- runs of different shapes, side by side --------------------------------------------------------
def train_alone(config: GPTConfig, train_ids: torch.Tensor, val_ids: torch.Tensor, settings: TrainConfig,
                init_seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    """``torch.manual_seed(init_seed); GPT(config)`` in ``dtype``, trained by the :class:`Trainer`
    alone with ``settings``; returned in eval mode. A function of its arguments only, so that
    :func:`in_processes` can run it in another process.

    Built in: 06_scaling
    """
    torch.manual_seed(init_seed)
    model = GPT(config).to(dtype)
    Trainer(model, train_ids, val_ids, settings).train()
    return model.eval()


def _timed_call(function: Callable, args: tuple) -> tuple[Any, int, float, float]:
    start = time.time()  # wall-clock time: comparable between processes
    result = function(*args)
    return result, os.getpid(), start, time.time()


def _one_thread_each(threads: int) -> None:
    torch.set_num_threads(threads)


def in_processes(function: Callable, calls: Sequence[tuple], processes: int = 2, threads: int = 1,
                 ) -> tuple[list, list[tuple[int, float, float]]]:
    """``[function(*args) for args in calls]``, computed by ``processes`` fresh worker processes with
    ``threads`` intra-op threads each, which take the calls in order as they come free. Returns the
    results in the calls' order, and for each call (worker 0, 1, ..., start, end) in seconds from
    the first start. ``function`` must be importable by name (a module's function, not a notebook's);
    an exception in a call is raised here.

    Small models gain little from a second thread per operation; two processes, one thread each,
    train two of them at once. The result of a call does not depend on how many processes there are.

    Built in: 06_scaling
    """
    for name, value in (("processes", processes), ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a whole number of at least 1")
    if not calls:
        return [], []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited thread pools
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_one_thread_each,
                             initargs=(threads,)) as pool:
        done = [f.result() for f in [pool.submit(_timed_call, function, tuple(args)) for args in calls]]
    workers = {pid: i for i, pid in enumerate(dict.fromkeys(pid for _, pid, _, _ in done))}
    first = min(start for _, _, start, _ in done)
    return ([result for result, _, _, _ in done],
            [(workers[pid], start - first, end - first) for _, pid, start, end in done])
