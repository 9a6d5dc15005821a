"""A trained minigpt, run token by token on the mesh simulator: :class:`Emulator` (load a model onto a
placement, step, generate) with its :class:`Phase` records, the cost model of each phase
(:func:`gemv_phase`, :func:`layernorm_phase`, :func:`attention_phase`, :func:`transfer_phase`), and
:func:`program`, the same program's predicted cycles on any grid without running it.

Every weight is tiled into the SRAM of the PEs of its stage's rectangle (a placement from chapter 11,
its stages stacked in one column of strips), and every step of the forward pass is a mesh program:

- a vector of the residual stream lives **across the top row** of a stage, a block per column;
- a product with a weight matrix is chapter 10's GEMV: the input goes down each column, each PE
  multiplies its block, and each row sums toward the stage's first column (output **down the first
  column**, a block per row); or the same turned by a right angle, from the first column back to the
  top row, so that no vector ever needs transposing;
- LayerNorm sums its block and the squares locally and allreduces the two sums along the top row;
- attention runs in the first column: each PE keeps the keys and values of its block of dimensions
  for every past position (the KV cache, in SRAM), computes its part of every head's scores, the
  column allreduces them, and each PE applies the softmax and sums its block of values;
- GELU, biases and residual adds are local; a transfer carries the stream from one stage's top row
  down the columns to the next stage's.

Each step is a separate simulator run (the phases of a program), and the cost model of chapter 10
predicts each one's cycles from the same shapes: GEMVs by :func:`wafer.cost.gemv_cycles`, the
allreduces by :func:`wafer.cost.allreduce_cycles`, transfers by :func:`wafer.cost.transfer_cycles`,
and local work at the cycles given here (one per multiply-add or element, a few for the
transcendental ones).

Built in: 14_emulation
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wafer.collectives import allreduce_plan, broadcast_plan, reduce_plan, route_path, straight
from wafer.cost import allreduce_cycles, gemv_cycles, transfer_cycles
from wafer.hardware import KERNEL_DTYPE, TOY, Wafer
from wafer.mesh import Compute, Mesh, Recv, Send
from wafer.placement import Placement
from wafer.stages import pipeline_stages
from wafer.strategies import flop_proportional
from wafer.target import Target
from wafer.workload import gpt_workload

# cycles per element of the local work (a convention, as chapter 09's vector FLOPs are)
CYCLES = {"add": 1, "layernorm": 4, "gelu": 8, "softmax": 4}


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Block boundaries of n items over ``parts`` PEs (the first n % parts get one more)."""
    edges = np.cumsum([0] + [n // parts + (1 if i < n % parts else 0) for i in range(parts)])
    return [(int(a), int(b)) for a, b in zip(edges, edges[1:])]


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@dataclass
class Phase:
    """One simulator run of the program: its name, the stage, and its cycles simulated and predicted."""

    name: str
    stage: str
    simulated: int
    predicted: int


# --- the cost model of each phase (chapter 10's formulas), shared by the emulator and program() -------


def gemv_phase(wafer: Wafer, out: int, inp: int, rect, turned: bool, finish: int, levels: int = 2) -> int:
    """A GEMV on ``rect`` from the top row to the first column (or, ``turned``, back), and the
    ``finish`` cycles per output element at the end (bias, GELU, residual)."""
    across = rect.h if not turned else rect.w  # output blocks
    grid = (rect.h, rect.w) if not turned else (rect.w, rect.h)  # (broadcast length, reduction length)
    block = max(b - a for a, b in _split(out, across))
    return gemv_cycles(wafer, out, inp, grid, levels).total + finish * block


def layernorm_phase(wafer: Wafer, n: int, pes: int, levels: int = 2) -> int:
    """Local sums, an allreduce of the two along ``pes`` PEs, the local normalisation."""
    block = max(b - a for a, b in _split(n, pes))
    sums = allreduce_cycles(wafer, pes, 2, levels) if pes > 1 else 0
    return 2 * block + sums + CYCLES["layernorm"] * block


def attention_phase(wafer: Wafer, n: int, heads: int, t: int, pes: int, levels: int = 2) -> int:
    """Partial scores of ``t`` positions, their allreduce down ``pes`` PEs, softmax and the values."""
    block = max(b - a for a, b in _split(n, pes))
    scores = allreduce_cycles(wafer, pes, heads * t, levels) if pes > 1 else 0
    return t * block + scores + CYCLES["softmax"] * heads * t + t * block


def transfer_phase(wafer: Wafer, n: int, pes: int, hops: int) -> int:
    return transfer_cycles(wafer, hops, max(b - a for a, b in _split(n, pes)))


def program(config, placement: Placement, position: int, levels: int = 2) -> list[tuple[str, str, int]]:
    """The cost model's (phase, stage, cycles) of one token at ``position`` for the emulator's program
    on ``placement``, without running it: the same phases, on grids of any size (WSE-2 included).

    Built in: 14_emulation
    """
    w, rects, names = placement.wafer, placement.rects, [s.name for s in placement.stages]
    c, t = config.n_embd, position + 1
    gap = [abs(rects[i + 1].y - rects[i].y) for i in range(len(rects) - 1)]
    out = [("embed", names[0], max(b - a for a, b in _split(c, rects[0].w))),
           ("transfer", names[0], transfer_phase(w, c, rects[0].w, gap[0]))]
    for layer in range(config.n_layer):
        i, r = layer + 1, rects[layer + 1]
        out.append(("layernorm", names[i], layernorm_phase(w, c, r.w, levels)))
        for name in ("Wq", "Wk", "Wv"):
            out.append((name, names[i], gemv_phase(w, c, c, r, False, CYCLES["add"], levels)))
        out.append(("attention", names[i], attention_phase(w, c, config.n_head, t, r.h, levels)))
        out.append(("Wo", names[i], gemv_phase(w, c, c, r, True, 2 * CYCLES["add"], levels)))
        out.append(("layernorm", names[i], layernorm_phase(w, c, r.w, levels)))
        gelu = CYCLES["add"] + CYCLES["gelu"]
        out.append(("Wfc", names[i], gemv_phase(w, 4 * c, c, r, False, gelu, levels)))
        out.append(("Wproj", names[i], gemv_phase(w, c, 4 * c, r, True, 2 * CYCLES["add"], levels)))
        out.append(("transfer", names[i], transfer_phase(w, c, r.w, gap[i])))
    r = rects[-1]
    out.append(("layernorm", names[-1], layernorm_phase(w, c, r.w, levels)))
    out.append(("Whead", names[-1], gemv_phase(w, config.vocab_size, c, r, False, 0, levels)))
    return out


class Emulator:
    """``model`` (a minigpt GPT) loaded onto a ``wafer`` grid with ``placement`` (by default
    FLOP-proportional strips in one column), run one token at a time.

    Built in: 14_emulation
    """

    def __init__(self, model, placement: Placement | None = None, wafer: Wafer = TOY, levels: int = 2):
        from minigpt.model import require_gpt2  # minigpt never imports wafer

        cfg = model.config
        require_gpt2(cfg, "the emulator")
        if cfg.mup:
            raise ValueError(f"the emulator runs GPT-2's standard parametrisation; this model uses muP "
                             f"(mup_base_width={cfg.mup_base_width})")
        if not cfg.bias:
            raise ValueError("the emulator expects biases in the Linear layers and LayerNorms (bias=True)")
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
        c = cfg.n_embd
        for r, s in zip(self.rects, placement.stages):
            if r.w > c or r.h > c:
                raise ValueError(f"stage {s.name}'s {r.w} x {r.h} rectangle is larger than n_embd={c} in a "
                                 f"direction: every PE needs at least one element of each vector")
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

    def _matrix(self, i: int, name: str, w, turned: bool) -> None:
        """Tile ``w`` (outputs x inputs) over stage i: rows over the stage's rows and columns over its
        columns (a GEMV from the top row to the first column), or the other way round if ``turned``."""
        r = self.rects[i]
        out, inp = w.shape
        rows = _split(out, r.w if turned else r.h)
        cols = _split(inp, r.h if turned else r.w)
        for p in range(r.h):
            for q in range(r.w):
                a, b = rows[q] if turned else rows[p]
                c0, c1 = cols[p] if turned else cols[q]
                self._store((r.x + q, r.y + p), name, w[a:b, c0:c1])

    def _vector(self, pes, name, v) -> None:
        for pe, (a, b) in zip(pes, _split(len(v), len(pes))):
            self._store(pe, name, v[a:b])

    def _load(self) -> None:
        sd = {k: v.detach().double().numpy() for k, v in self.model.state_dict().items()}
        c, t = self.config.n_embd, self.config.block_size
        top = self._top(0)
        self._vector(top, "x", np.zeros(c))
        for q, (a, b) in enumerate(_split(c, self.width)):  # the embedding stage: columns of both tables
            self._store(top[q], "wte", sd["transformer.wte.weight"][:, a:b])
            self._store(top[q], "wpe", sd["transformer.wpe.weight"][:, a:b])
        for layer in range(self.config.n_layer):
            i, pre = layer + 1, f"transformer.h.{layer}."
            top, first = self._top(i), self._first(i)
            self._vector(top, "x", np.zeros(c))
            for ln in ("ln_1", "ln_2"):
                self._vector(top, f"{ln}.g", sd[pre + ln + ".weight"])
                self._vector(top, f"{ln}.b", sd[pre + ln + ".bias"])
            wq, wk, wv = np.split(sd[pre + "attn.c_attn.weight"], 3)
            bq, bk, bv = np.split(sd[pre + "attn.c_attn.bias"], 3)
            for name, w, bias in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
                self._matrix(i, "W" + name, w, turned=False)
                self._vector(first, "b" + name, bias)
            self._matrix(i, "Wo", sd[pre + "attn.c_proj.weight"], turned=True)
            self._vector(top, "bo", sd[pre + "attn.c_proj.bias"])
            self._matrix(i, "Wfc", sd[pre + "mlp.c_fc.weight"], turned=False)
            self._vector(first, "bfc", sd[pre + "mlp.c_fc.bias"])
            self._matrix(i, "Wproj", sd[pre + "mlp.c_proj.weight"], turned=True)
            self._vector(top, "bproj", sd[pre + "mlp.c_proj.bias"])
            for pe, (a, b) in zip(first, _split(c, len(first))):  # the KV cache, for the whole context
                self._store(pe, "K", np.zeros((t, b - a)))
                self._store(pe, "V", np.zeros((t, b - a)))
        head = len(self.rects) - 1
        top = self._top(head)
        self._vector(top, "x", np.zeros(c))
        self._vector(top, "ln_f.g", sd["transformer.ln_f.weight"])
        self._vector(top, "ln_f.b", sd["transformer.ln_f.bias"])
        self._matrix(head, "Whead", sd["lm_head.weight"], turned=False)

    # -- running -----------------------------------------------------------------------------------------
    def _run(self, name: str, i: int, tasks: dict, predicted: int) -> None:
        for pe, ops in tasks.items():
            if ops:
                self.mesh.program(pe, ops)
        report = self.mesh.run()
        self.mesh.clear_routes()
        self.phases.append(Phase(name, self.placement.stages[i].name, report.cycles, int(predicted)))

    def _gemv(self, i: int, w: str, src: str, dst: str, out: int, inp: int, turned: bool, finish) -> None:
        """dst = finish(W src) on stage i: from the top row to the first column, or (``turned``) from the
        first column to the top row. ``finish(mem, part)`` writes the result at each output PE, and
        ``(name, cycles per element)`` of it are recorded."""
        r = self.rects[i]
        along, across = (r.w, r.h) if not turned else (r.h, r.w)  # input blocks, output blocks
        ins, outs = _split(inp, along), _split(out, across)
        tasks: dict = {}
        for a in range(along):  # broadcast each input block across the rectangle
            line = ([(r.x + a, r.y + p) for p in range(r.h)] if not turned else
                    [(r.x + q, r.y + a) for q in range(r.w)])
            n = ins[a][1] - ins[a][0]
            for pe, ops in broadcast_plan(self.mesh, line[0], line, src, n, 0).items():
                tasks.setdefault(pe, []).extend(ops)
        for b in range(across):  # multiply, then sum each output block toward the first PE of its line
            line = ([(r.x + q, r.y + b) for q in range(r.w)] if not turned else
                    [(r.x + b, r.y + p) for p in range(r.h)])
            m = outs[b][1] - outs[b][0]
            for pe in line:
                lo, hi = ins[pe[0] - r.x] if not turned else ins[pe[1] - r.y]  # the input block it gets
                self._store(pe, "part", np.zeros(m))
                tasks.setdefault(pe, []).append(Compute(
                    math.ceil(m * (hi - lo) / self.wafer.fp32_fmacs_per_cycle),
                    lambda mem, w=w, src=src: mem.__setitem__("part", mem[w] @ mem[src]), "W x"))
            plan = (reduce_plan(self.mesh, line, "part", m, self.levels, first_color=1) if len(line) > 1
                    else {})
            for pe, ops in plan.items():
                tasks[pe].extend(ops)
            tasks[line[0]].append(Compute(finish[1] * m, lambda mem: finish[0](mem, mem["part"]), dst))
        self._run(w, i, tasks, gemv_phase(self.wafer, out, inp, r, turned, finish[1], self.levels))

    def _layernorm(self, i: int, src: str, dst: str, g: str, b: str) -> None:
        """dst = LayerNorm(src) across the top row of stage i."""
        top, c = self._top(i), self.config.n_embd
        eps = self.config.layer_norm_epsilon
        tasks: dict = {}
        for pe in top:
            self._store(pe, "sums", np.zeros(2))
            tasks[pe] = [Compute(2 * len(self.mesh.load(pe, src)), lambda mem: mem.__setitem__(
                "sums", np.array([mem[src].sum(), (mem[src] ** 2).sum()])), "sums")]
        if len(top) > 1:
            for pe, ops in allreduce_plan(self.mesh, top, "sums", 2, self.levels).items():
                tasks[pe] += ops

        def normalize(mem):
            mean = mem["sums"][0] / c
            var = mem["sums"][1] / c - mean**2
            mem[dst] = (mem[src] - mean) / np.sqrt(var + eps) * mem[g] + mem[b]

        for pe in top:
            n = len(self.mesh.load(pe, src))
            self._store(pe, dst, np.zeros(n))
            tasks[pe].append(Compute(CYCLES["layernorm"] * n, normalize, "normalize"))
        self._run("layernorm", i, tasks, layernorm_phase(self.wafer, c, len(top), self.levels))

    def _attention(self, i: int) -> None:
        """The new position's q, k, v (down the first column) against the cache: out 'o'."""
        first, cfg = self._first(i), self.config
        t, heads, hd = self.position + 1, cfg.n_head, cfg.head_dim
        blocks = _split(cfg.n_embd, len(first))
        tasks: dict = {}
        for pe, (a, b) in zip(first, blocks):
            self._store(pe, "scores", np.zeros(heads * t))

            def partial(mem, a=a, b=b):
                mem["K"][t - 1], mem["V"][t - 1] = mem["k"], mem["v"]  # the cache grows in place
                s = np.zeros((heads, t))
                for h in range(heads):
                    lo, hi = max(a, h * hd), min(b, (h + 1) * hd)
                    if lo < hi:
                        s[h] = mem["K"][:t, lo - a:hi - a] @ mem["q"][lo - a:hi - a]
                mem["scores"] = s.reshape(-1)

            tasks[pe] = [Compute(t * (b - a), partial, "q . K")]
        if len(first) > 1:
            for pe, ops in allreduce_plan(self.mesh, first, "scores", heads * t, self.levels).items():
                tasks[pe] += ops
        for pe, (a, b) in zip(first, blocks):
            self._store(pe, "o", np.zeros(b - a))

            def weigh(mem, a=a, b=b):
                s = mem["scores"].reshape(heads, t) / math.sqrt(hd)
                p = np.exp(s - s.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                head_of = (np.arange(a, b) // hd)
                mem["o"] = np.einsum("tj,jt->j", mem["V"][:t], p[head_of])

            tasks[pe].append(Compute(CYCLES["softmax"] * heads * t + t * (b - a), weigh, "softmax, p V"))
        predicted = attention_phase(self.wafer, cfg.n_embd, heads, t, len(first), self.levels)
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
        cfg = self.config
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token={token} must be in [0, {cfg.vocab_size})")
        if self.position >= cfg.block_size:
            raise ValueError(f"the context is full: block_size={cfg.block_size} positions")
        pos = self.position
        tasks = {pe: [Compute(len(self.mesh.load(pe, "x")), lambda mem: mem.__setitem__(
            "x", mem["wte"][token] + mem["wpe"][pos]), "embed")] for pe in self._top(0)}
        self._run("embed", 0, tasks, max(b - a for a, b in _split(cfg.n_embd, self.width)))
        self._transfer(0)
        c = cfg.n_embd

        def bias(name, fn=None, into=None):  # what the output PE does with a block of W x
            def f(mem, part):
                y = part + mem[name]
                y = fn(y) if fn else y
                if into:
                    mem[into] = mem[into] + y
                else:
                    mem[dst_of[name]] = y
            return f

        dst_of = {"bq": "q", "bk": "k", "bv": "v", "bfc": "h"}
        for layer in range(cfg.n_layer):
            i = layer + 1
            self._layernorm(i, "x", "a", "ln_1.g", "ln_1.b")
            for name in ("q", "k", "v"):
                self._gemv(i, "W" + name, "a", name, c, c, False, (bias("b" + name), CYCLES["add"]))
            self._attention(i)
            self._gemv(i, "Wo", "o", "x", c, c, True, (bias("bo", into="x"), 2 * CYCLES["add"]))
            self._layernorm(i, "x", "a", "ln_2.g", "ln_2.b")
            gelu = (bias("bfc", _gelu), CYCLES["add"] + CYCLES["gelu"])
            self._gemv(i, "Wfc", "a", "h", 4 * c, c, False, gelu)
            self._gemv(i, "Wproj", "h", "x", c, 4 * c, True, (bias("bproj", into="x"), 2 * CYCLES["add"]))
            self._transfer(i)
        head = len(self.rects) - 1
        self._layernorm(head, "x", "a", "ln_f.g", "ln_f.b")
        self._gemv(head, "Whead", "a", "logits", cfg.vocab_size, c, False,
                   (lambda mem, part: mem.__setitem__("logits", part), 0))
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
