"""A trained minigpt, run token by token on the mesh simulator: :class:`Emulator` (load a model onto a
placement, step, generate) with its :class:`Phase` records. The cost model of each phase and
:func:`program`, the same program's predicted cycles on any grid without running it, are in
:mod:`wafer.phases` (and importable from here).

Every weight is tiled into the SRAM of the PEs of its stage's rectangle (a placement from chapter 11,
its stages stacked in one column of strips), and every step of the forward pass is a mesh program:

- a vector of the residual stream lives **across the top row** of a stage, a block per column;
- a product with a weight matrix is chapter 10's GEMV: the input goes down each column, each PE
  multiplies its block, and each row sums toward the stage's first column (output **down the first
  column**, a block per row); or the same turned by a right angle, from the first column back to the
  top row, so that no vector ever needs transposing;
- LayerNorm sums its block and the squares locally and allreduces the two sums along the top row;
  RMSNorm allreduces the sum of squares alone;
- attention runs in the first column: each PE keeps the keys and values of its block of dimensions
  for every past position (the KV cache, in SRAM), computes its part of every head's scores, the
  column allreduces them, and each PE applies the softmax and sums its block of values;
- GELU, SwiGLU's gate, RoPE's rotation, biases and residual adds are local; a transfer carries the
  stream from one stage's top row down the columns to the next stage's.

LLaMA's options (chapter 03) run on the same program. Where a computation needs two elements on one
PE, the weight's rows are reordered at load time, so that the product itself puts them there:

- **RoPE** rotates the pairs (i, i + head_dim/2) of each head's query and key. Wq's and Wk's rows
  are permuted, in every head alike, to the interleaved order, where the pair is (2i, 2i + 1): the
  same rotation in a reordered basis. A score q . k is a sum over the dimensions, unchanged when q
  and k are permuted alike; Wv's rows are permuted alike too, and Wo's columns as Wq's rows, which
  undoes it. Blocks hold whole pairs, and each PE keeps its pairs' frequencies.
- **Grouped-query attention**: n_head / n_kv_head query heads share each key-value head. The first
  column cuts the keys and values (n_kv_head x head_dim wide) into blocks, and Wq's rows are ordered
  so that a PE's queries are, for each of its key dimensions, that dimension of every query head of
  the group. The partial scores stay local, and the KV cache in SRAM is smaller by the group.
- **SwiGLU**: c_fc's rows are reordered gate, up, gate, up, ..., so that each PE's block of the
  product holds whole (gate, up) pairs: silu(gate) x up is local, and the hidden vector comes out in
  the blocks the down product (Wproj) reads.
- No biases, no position table (the stream starts as the token's row), an untied head: nothing to
  store, and nothing to add.

Built in: 14_emulation
"""

from __future__ import annotations

import math

import numpy as np

from wafer.collectives import allreduce_plan, broadcast_plan, reduce_plan, route_path, straight
from wafer.hardware import KERNEL_DTYPE, TOY, Wafer
from wafer.mesh import Compute, Mesh, Recv, Send
from wafer.phases import (
    CYCLES,
    Layout,
    Phase,
    Product,
    attention_phase,
    gemv_phase,
    largest,
    layout,
    norm_phase,
    split,
    transfer_phase,
)
from wafer.phases import program as program  # the emulator's program, predicted: importable from here
from wafer.placement import Placement
from wafer.stages import pipeline_stages
from wafer.strategies import flop_proportional
from wafer.target import Target
from wafer.workload import gpt_workload


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _swiglu(x):
    """silu(gate) x up, for a block of (gate, up) pairs side by side."""
    gate, up = x[0::2], x[1::2]
    return gate * 0.5 * (1.0 + np.tanh(gate / 2)) * up  # sigmoid(g) = (1 + tanh(g/2)) / 2, no overflow


def _rotate(x, freq, pos: int):
    """RoPE on a block in the interleaved order, viewed as pairs x 2 x heads (a query block holds each
    dimension of the group's heads side by side; a key block, one head): pair j turned by pos x freq[j]."""
    y = x.reshape(len(freq), 2, -1)
    angle = (pos * freq)[:, None]
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([y[:, 0] * cos - y[:, 1] * sin, y[:, 0] * sin + y[:, 1] * cos], axis=1).reshape(-1)


def _orders(lay: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The load-time order of Wq's rows (and of Wo's columns), of Wk's and Wv's rows, of Wfc's rows
    (each the identity for GPT-2). Key dimension e holds, in head e // head_dim, dimension ``within[e %
    head_dim]`` (RoPE's pair (i, i + head_dim/2) at (2i, 2i + 1)); the queries come in the key
    dimensions' order, each with the ``group`` query heads that read it."""
    hd, g = lay.head_dim, lay.group
    d = np.arange(hd)
    within = d // 2 + d % 2 * (hd // 2) if lay.positions == "rope" else d
    e = np.arange(lay.kv)
    kv = e // hd * hd + within[e % hd]
    e, m = np.repeat(e, g), np.tile(np.arange(g), lay.kv)
    q = (e // hd * g + m) * hd + within[e % hd]
    f = np.arange(lay.hidden)
    fc = np.stack([f, lay.hidden + f], axis=1).reshape(-1) if lay.gated else f
    return q, kv, fc


class Emulator:
    """``model`` (a minigpt GPT, GPT-2-style, LLaMA-style or any mix of their options that
    :func:`wafer.phases.layout` accepts) loaded onto a ``wafer`` grid with ``placement`` (by default
    FLOP-proportional strips in one column), run one token at a time.

    Built in: 14_emulation
    """

    def __init__(self, model, placement: Placement | None = None, wafer: Wafer = TOY, levels: int = 2):
        cfg = model.config
        self.layout = layout(cfg)  # a ValueError for an option the program cannot take
        self.model, self.config, self.levels = model, cfg, levels
        if placement is None:
            stages = pipeline_stages(gpt_workload(cfg, context=cfg.block_size, dtype=KERNEL_DTYPE))
            target = Target(wafer, context=cfg.block_size, dtype=KERNEL_DTYPE)
            placement = flop_proportional(stages, target, columns=1)
        xs = {(r.x, r.w) for r in placement.rects}
        if len(xs) != 1:
            raise ValueError(f"the emulator needs its stages stacked in one column of strips of one width "
                             f"(strips(..., columns=1)); this placement has {len(xs)} (x, width) pairs")
        self.placement, self.wafer = placement, placement.wafer
        self.rects = placement.rects
        self.width = self.rects[0].w
        c, lay = cfg.n_embd, self.layout
        for r, s in zip(self.rects, placement.stages):
            if r.w > c or r.h > c:
                raise ValueError(f"stage {s.name}'s {r.w} x {r.h} rectangle is larger than n_embd={c} in a "
                                 f"direction: every PE needs at least one element of each vector")
        units = lay.kv // lay.pair
        for r, s in zip(self.rects[1:-1], placement.stages[1:-1]):
            if r.h > units:
                what = "pairs of key dimensions" if lay.pair == 2 else "key dimensions"
                raise ValueError(f"stage {s.name}'s {r.w} x {r.h} rectangle has more rows than the {units} "
                                 f"{what} (n_kv_head x head_dim = {lay.kv}): every PE of its first column "
                                 f"needs at least one")
        self.mesh = Mesh(self.wafer.width, self.wafer.height, self.wafer)
        self.phases: list[Phase] = []
        self.position = 0
        self._load()

    # -- layout ----------------------------------------------------------------------------------------
    def _top(self, i: int) -> list[tuple[int, int]]:
        r = self.rects[i]
        return [(r.x + q, r.y) for q in range(r.w)]

    def _first(self, i: int) -> list[tuple[int, int]]:
        r = self.rects[i]
        return [(r.x, r.y + p) for p in range(r.h)]

    def _store(self, pe, name, values) -> None:
        self.mesh.store(pe, name, np.asarray(values, dtype=np.float64))

    def _matrix(self, i: int, name: str, w, turned: bool, units: tuple[int, int] = (1, 1)) -> None:
        """Tile ``w`` (outputs x inputs) over stage i: rows over the stage's rows and columns over its
        columns (a GEMV from the top row to the first column), or the other way round if ``turned``;
        blocks of whole ``units`` (of outputs, of inputs)."""
        r = self.rects[i]
        out, inp = w.shape
        rows = split(out, r.w if turned else r.h, units[0])
        cols = split(inp, r.h if turned else r.w, units[1])
        for p in range(r.h):
            for q in range(r.w):
                a, b = rows[q] if turned else rows[p]
                c0, c1 = cols[p] if turned else cols[q]
                self._store((r.x + q, r.y + p), name, w[a:b, c0:c1])

    def _vector(self, pes, name, v, unit: int = 1) -> None:
        for pe, (a, b) in zip(pes, split(len(v), len(pes), unit)):
            self._store(pe, name, v[a:b])

    def _load(self) -> None:
        sd = {k: v.detach().double().numpy() for k, v in self.model.state_dict().items()}
        cfg, lay = self.config, self.layout
        c, t, kv = cfg.n_embd, cfg.block_size, lay.kv
        q_order, kv_order, fc_order = _orders(lay)
        qu, fu = lay.group * lay.pair, 2 if lay.gated else 1  # the units of q's and of c_fc's blocks
        top = self._top(0)
        self._vector(top, "x", np.zeros(c))
        for q, (a, b) in enumerate(split(c, self.width)):  # the embedding stage: columns of the tables
            self._store(top[q], "wte", sd["transformer.wte.weight"][:, a:b])
            if lay.positions == "learned":
                self._store(top[q], "wpe", sd["transformer.wpe.weight"][:, a:b])
        freq = cfg.rope_theta ** (-np.arange(0, lay.head_dim, 2, dtype=np.float64) / lay.head_dim)
        for layer in range(cfg.n_layer):
            i, pre = layer + 1, f"transformer.h.{layer}."
            top, first = self._top(i), self._first(i)
            self._vector(top, "x", np.zeros(c))
            self._norm_params(top, pre, ("ln_1", "ln_2"), sd)
            ws = np.split(sd[pre + "attn.c_attn.weight"], [c, c + kv])
            bs = np.split(sd[pre + "attn.c_attn.bias"], [c, c + kv]) if lay.biased else [None] * 3
            for name, w, bias, order, unit in zip("qkv", ws, bs, (q_order, kv_order, kv_order),
                                                  (qu, lay.pair, lay.pair)):
                self._matrix(i, "W" + name, w[order], turned=False, units=(unit, 1))
                if bias is not None:
                    self._vector(first, "b" + name, bias[order], unit)
            self._matrix(i, "Wo", sd[pre + "attn.c_proj.weight"][:, q_order], turned=True, units=(1, qu))
            self._matrix(i, "Wfc", sd[pre + "mlp.c_fc.weight"][fc_order], turned=False, units=(fu, 1))
            self._matrix(i, "Wproj", sd[pre + "mlp.c_proj.weight"], turned=True)
            if lay.biased:
                self._vector(top, "bo", sd[pre + "attn.c_proj.bias"])
                self._vector(first, "bfc", sd[pre + "mlp.c_fc.bias"][fc_order], fu)
                self._vector(top, "bproj", sd[pre + "mlp.c_proj.bias"])
            for pe, (a, b) in zip(first, split(kv, len(first), lay.pair)):  # the KV cache, whole context
                self._store(pe, "K", np.zeros((t, b - a)))
                self._store(pe, "V", np.zeros((t, b - a)))
                if lay.positions == "rope":  # the frequency of each of its pairs
                    self._store(pe, "freq", freq[np.arange(a, b, 2) % lay.head_dim // 2])
        head = len(self.rects) - 1
        top = self._top(head)
        self._vector(top, "x", np.zeros(c))
        self._norm_params(top, "transformer.", ("ln_f",), sd)
        self._matrix(head, "Whead", sd["lm_head.weight"], turned=False)

    def _norm_params(self, top, pre: str, names, sd) -> None:
        for ln in names:  # the scale, and LayerNorm's shift where it has one
            self._vector(top, f"{ln}.g", sd[pre + ln + ".weight"])
            if pre + ln + ".bias" in sd:
                self._vector(top, f"{ln}.b", sd[pre + ln + ".bias"])

    # -- running -----------------------------------------------------------------------------------------
    def _run(self, name: str, i: int, tasks: dict, predicted: int) -> None:
        for pe, ops in tasks.items():
            if ops:
                self.mesh.program(pe, ops)
        report = self.mesh.run()
        self.mesh.clear_routes()
        self.phases.append(Phase(name, self.placement.stages[i].name, report.cycles, int(predicted)))

    def _gemv(self, i: int, p: Product, src: str, dst: str, finish) -> None:
        """dst = finish(W src) on stage i for the product ``p``: from the top row to the first column,
        or (``p.turned``) from the first column to the top row. ``finish(mem, part)`` writes the result
        at each output PE, at ``p.finish`` cycles per element."""
        r = self.rects[i]
        along, across = (r.w, r.h) if not p.turned else (r.h, r.w)  # input blocks, output blocks
        ins, outs = split(p.inp, along, p.units[1]), split(p.out, across, p.units[0])
        tasks: dict = {}
        for a in range(along):  # broadcast each input block across the rectangle
            line = ([(r.x + a, r.y + k) for k in range(r.h)] if not p.turned else
                    [(r.x + k, r.y + a) for k in range(r.w)])
            n = ins[a][1] - ins[a][0]
            for pe, ops in broadcast_plan(self.mesh, line[0], line, src, n, 0).items():
                tasks.setdefault(pe, []).extend(ops)
        for b in range(across):  # multiply, then sum each output block toward the first PE of its line
            line = ([(r.x + k, r.y + b) for k in range(r.w)] if not p.turned else
                    [(r.x + b, r.y + k) for k in range(r.h)])
            m = outs[b][1] - outs[b][0]
            for pe in line:
                lo, hi = ins[pe[0] - r.x] if not p.turned else ins[pe[1] - r.y]  # the input block it gets
                self._store(pe, "part", np.zeros(m))
                tasks.setdefault(pe, []).append(Compute(
                    math.ceil(m * (hi - lo) / self.wafer.fp32_fmacs_per_cycle),
                    lambda mem, w=p.name, src=src: mem.__setitem__("part", mem[w] @ mem[src]), "W x"))
            plan = (reduce_plan(self.mesh, line, "part", m, self.levels, first_color=1) if len(line) > 1
                    else {})
            for pe, ops in plan.items():
                tasks[pe].extend(ops)
            tasks[line[0]].append(Compute(p.finish * m, lambda mem: finish(mem, mem["part"]), dst))
        predicted = gemv_phase(self.wafer, p.out, p.inp, r, p.turned, p.finish, self.levels, p.units)
        self._run(p.name, i, tasks, predicted)

    def _norm(self, i: int, src: str, dst: str, name: str) -> None:
        """dst = LayerNorm(src) or RMSNorm(src), as the model's, across the top row of stage i, with the
        parameters ``name``.g (and ``name``.b)."""
        top, c, rms = self._top(i), self.config.n_embd, self.layout.norm == "rmsnorm"
        eps, g, b, k = self.config.layer_norm_epsilon, f"{name}.g", f"{name}.b", 1 if rms else 2
        tasks: dict = {}

        def sums(mem):  # the block's sum of squares (RMSNorm), or its sum and sum of squares
            squares = (mem[src] ** 2).sum()
            mem["sums"] = np.array([squares] if rms else [mem[src].sum(), squares])

        for pe in top:
            self._store(pe, "sums", np.zeros(k))
            tasks[pe] = [Compute(k * len(self.mesh.load(pe, src)), sums, "sums")]
        if len(top) > 1:
            for pe, ops in allreduce_plan(self.mesh, top, "sums", k, self.levels).items():
                tasks[pe] += ops

        def normalize(mem):
            if rms:
                mem[dst] = mem[src] / np.sqrt(mem["sums"][0] / c + eps) * mem[g]
                return
            mean = mem["sums"][0] / c
            var = mem["sums"][1] / c - mean**2
            y = (mem[src] - mean) / np.sqrt(var + eps) * mem[g]
            mem[dst] = y + mem[b] if b in mem else y

        for pe in top:
            n = len(self.mesh.load(pe, src))
            self._store(pe, dst, np.zeros(n))
            tasks[pe].append(Compute(CYCLES[self.layout.norm] * n, normalize, "normalize"))
        norm = self.layout.norm
        self._run(norm, i, tasks, norm_phase(self.wafer, norm, c, len(top), self.levels))

    def _attention(self, i: int) -> None:
        """The new position's q, k, v (down the first column) against the cache: out 'o'. A PE holds
        key dimensions [a, b) and, for each, the ``group`` query dimensions that meet it."""
        first, cfg, lay = self._first(i), self.config, self.layout
        t, heads, hd, group = self.position + 1, cfg.n_head, cfg.head_dim, lay.group
        blocks = split(lay.kv, len(first), lay.pair)
        tasks: dict = {}
        for pe, (a, b) in zip(first, blocks):
            self._store(pe, "scores", np.zeros(heads * t))

            def partial(mem, a=a, b=b):
                mem["K"][t - 1], mem["V"][t - 1] = mem["k"], mem["v"]  # the cache grows in place
                q = mem["q"].reshape(b - a, group)
                s = np.zeros((heads, t))
                for h in range(heads):
                    g = h // group  # its key-value head
                    lo, hi = max(a, g * hd), min(b, (g + 1) * hd)
                    if lo < hi:
                        s[h] = mem["K"][:t, lo - a:hi - a] @ q[lo - a:hi - a, h % group]
                mem["scores"] = s.reshape(-1)

            tasks[pe] = [Compute(t * group * (b - a), partial, "q . K")]
        if len(first) > 1:
            for pe, ops in allreduce_plan(self.mesh, first, "scores", heads * t, self.levels).items():
                tasks[pe] += ops
        for pe, (a, b) in zip(first, blocks):
            self._store(pe, "o", np.zeros(group * (b - a)))

            def weigh(mem, a=a, b=b):
                s = mem["scores"].reshape(heads, t) / math.sqrt(hd)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                e = np.repeat(np.arange(b - a), group)  # each query dimension's key dimension
                head_of = (a + e) // hd * group + np.tile(np.arange(group), b - a)
                values = mem["V"][:t] if group == 1 else mem["V"][:t, e]
                mem["o"] = np.einsum("tj,jt->j", values, p[head_of])

            cycles = CYCLES["softmax"] * heads * t + t * group * (b - a)
            tasks[pe].append(Compute(cycles, weigh, "softmax, p V"))
        predicted = attention_phase(self.wafer, cfg.n_embd, heads, t, len(first), self.levels,
                                    group * lay.pair)
        self._run("attention", i, tasks, predicted)

    def _transfer(self, i: int) -> None:
        """The stream from stage i's top row to stage i + 1's, down the columns."""
        src, dst = self._top(i), self._top(i + 1)
        tasks: dict = {}
        route = 0
        for a, b in zip(src, dst):
            route_path(self.mesh, straight(a, b), route)
            n = len(self.mesh.load(a, "x"))
            tasks.setdefault(a, []).append(Send(route, "x"))
            tasks.setdefault(b, []).append(Recv(route, "x", n))
        hops = abs(dst[0][1] - src[0][1])
        self._run("transfer", i, tasks, transfer_phase(self.wafer, self.config.n_embd, len(src), hops))

    def step(self, token: int) -> np.ndarray:
        """Run one token at the next position through every stage; return its logits."""
        cfg, lay = self.config, self.layout
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token={token} must be in [0, {cfg.vocab_size})")
        if self.position >= cfg.block_size:
            raise ValueError(f"the context is full: block_size={cfg.block_size} positions")
        pos, learned = self.position, lay.positions == "learned"

        def embed(mem):
            mem["x"] = mem["wte"][token] + mem["wpe"][pos] if learned else mem["wte"][token].copy()

        tasks = {pe: [Compute(len(self.mesh.load(pe, "x")), embed, "embed")] for pe in self._top(0)}
        self._run("embed", 0, tasks, largest(cfg.n_embd, self.width))
        self._transfer(0)

        def finish(bias=None, then=None, into=None, dst=None):  # what the output PE does with W x
            def f(mem, part):
                y = part + mem[bias] if bias else part.copy()
                y = then(mem, y) if then else y
                if into:
                    mem[into] = mem[into] + y
                else:
                    mem[dst] = y
            return f

        def bias(name):
            return name if lay.biased else None

        def rope(mem, y):
            return _rotate(y, mem["freq"], pos)

        products = lay.products()
        rotate = rope if lay.positions == "rope" else None
        act = (lambda mem, y: _swiglu(y)) if lay.gated else (lambda mem, y: _gelu(y))
        for layer in range(cfg.n_layer):
            i = layer + 1
            self._norm(i, "x", "a", "ln_1")
            for name in ("q", "k", "v"):
                then = rotate if name != "v" else None
                self._gemv(i, products["W" + name], "a", name, finish(bias("b" + name), then, dst=name))
            self._attention(i)
            self._gemv(i, products["Wo"], "o", "x", finish(bias("bo"), into="x"))
            self._norm(i, "x", "a", "ln_2")
            self._gemv(i, products["Wfc"], "a", "h", finish(bias("bfc"), act, dst="h"))
            self._gemv(i, products["Wproj"], "h", "x", finish(bias("bproj"), into="x"))
            self._transfer(i)
        head = len(self.rects) - 1
        self._norm(head, "x", "a", "ln_f")
        self._gemv(head, products["Whead"], "a", "logits", lambda mem, part: mem.__setitem__("logits", part))
        self.position += 1
        return np.concatenate([self.mesh.load(pe, "logits") for pe in self._first(head)])

    def reset(self) -> None:
        """Start a new sequence (the cache is overwritten as positions are reused)."""
        self.position = 0
        self.phases = []

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy generation: the prompt one token at a time, then ``new_tokens`` more."""
        if not prompt:
            raise ValueError("prompt is empty: generation needs at least one token")
        self.reset()
        out = list(prompt)
        for token in prompt[:-1]:
            self.step(token)
        logits = self.step(prompt[-1])
        for _ in range(new_tokens):
            out.append(int(np.argmax(logits)))
            if len(out) > self.config.block_size:
                break
            logits = self.step(out[-1])
        return out[: len(prompt) + new_tokens]

    def cycles(self) -> tuple[int, int]:
        """(simulated, predicted) cycles of every phase run so far."""
        return sum(p.simulated for p in self.phases), sum(p.predicted for p in self.phases)
