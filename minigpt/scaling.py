"""Scaling laws: training FLOPs, compute-optimal sizes, fitting L(C) = a C^-b + E, Cerebras-GPT's
published models and law (and the Model Zoo's FLOP count, chapter 12), and muP's coordinate check
(activation scales across widths).

Built in: 06_scaling
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from minigpt.checks import positive_int
from minigpt.model import GPT, GPTConfig, flops_per_token

TOKENS_PER_PARAMETER = 20.0  # the compute-optimal ratio of Hoffmann et al. (2022), used by Cerebras-GPT


def training_flops_6nd(n_params: float, n_tokens: float) -> float:
    """The usual estimate: 6 FLOPs per parameter per token (2 forward, 4 backward).

    Built in: 06_scaling
    """
    return 6.0 * n_params * n_tokens


def training_flops(config: GPTConfig, n_tokens: float, context: int | None = None,
                   embedding_matmul: bool = False) -> float:
    """Training FLOPs counted from the model's matrix products (chapter 03's formula), attention and
    the output head included: ``3 x forward FLOPs per token x tokens``.

    ``embedding_matmul=True`` also counts the token-embedding lookup as if it were a product of a
    one-hot vector with the (vocab x n_embd) matrix, 2 x n_embd x vocab FLOPs per token forward, as
    Cerebras-GPT's training table does (chapter 06 shows this reproduces it). A lookup does none of
    that arithmetic; the convention only changes what is reported.

    Built in: 06_scaling
    """
    forward = flops_per_token(config, context)["forward"]
    if embedding_matmul:
        forward += 2.0 * config.n_embd * config.vocab_size
    return 3.0 * forward * n_tokens


def compute_optimal_tokens(n_params: float, ratio: float = TOKENS_PER_PARAMETER) -> float:
    """Tokens to train ``n_params`` parameters compute-optimally: about 20 per parameter.

    Built in: 06_scaling
    """
    if n_params <= 0 or ratio <= 0:
        raise ValueError(f"n_params={n_params} and ratio={ratio} must be positive")
    return ratio * n_params


def compute_optimal_params(flops: float, ratio: float = TOKENS_PER_PARAMETER) -> float:
    """The parameter count N with 6 N (ratio N) = ``flops``: the model a compute budget affords.

    Built in: 06_scaling
    """
    if flops <= 0 or ratio <= 0:
        raise ValueError(f"flops={flops} and ratio={ratio} must be positive")
    return math.sqrt(flops / (6.0 * ratio))


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = a C^-b + E, with one-standard-error uncertainties from the fit's covariance."""

    a: float
    b: float
    E: float
    a_err: float
    b_err: float
    E_err: float
    rms_residual: float

    def __call__(self, c):
        return self.a * np.power(np.asarray(c, dtype=float), -self.b) + self.E


def fit_power_law(compute, loss, iterations: int = 200) -> PowerLawFit:
    """Least-squares fit of L = a C^-b + E (Levenberg-Marquardt on log a, b, E).

    ``compute`` may span many orders of magnitude: the fit works in x = ln C, centred, so that the
    three parameters are of comparable scale. Needs at least four points (three parameters plus one
    degree of freedom for the uncertainties).

    Built in: 06_scaling
    """
    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"compute {c.shape} and loss {y.shape} must be 1-D and of the same length")
    if len(c) < 4:
        raise ValueError(f"{len(c)} points: a fit of a, b and E needs at least 4")
    if (c <= 0).any() or not np.isfinite(y).all():
        raise ValueError("compute must be positive and losses finite")
    x = np.log(c)
    x0 = x.mean()
    u = x - x0

    def model(p):  # p = (alpha, b, E) with a C^-b = exp(alpha - b u)
        return np.exp(p[0] - p[1] * u) + p[2]

    def jacobian(p):
        e = np.exp(p[0] - p[1] * u)
        return np.stack([e, -u * e, np.ones_like(u)], axis=1)

    # start: E a little below the smallest loss, then a straight line in log-log for the rest
    e0 = y.min() - 0.5 * (y.max() - y.min()) - 1e-3
    slope, intercept = np.polyfit(u, np.log(y - e0), 1)
    p = np.array([intercept, -slope, e0])
    damping = 1e-3
    cost = np.sum((y - model(p)) ** 2)
    for _ in range(iterations):
        j, r = jacobian(p), y - model(p)
        jtj = j.T @ j
        step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj)), j.T @ r)
        trial = p + step
        trial_cost = np.sum((y - model(trial)) ** 2)
        if trial_cost < cost:
            p, cost, damping = trial, trial_cost, damping / 3
            if np.abs(step).max() < 1e-12:
                break
        else:
            damping *= 4
    j = jacobian(p)
    dof = len(y) - 3
    sigma2 = cost / dof if dof > 0 else float("nan")
    cov = sigma2 * np.linalg.pinv(j.T @ j)
    alpha, b, e = p
    log_a = alpha + b * x0  # a C^-b = exp(alpha - b (ln C - x0))
    # var(ln a) = var(alpha) + x0^2 var(b) + 2 x0 cov(alpha, b)
    var_log_a = cov[0, 0] + x0**2 * cov[1, 1] + 2 * x0 * cov[0, 1]
    a = math.exp(log_a)
    return PowerLawFit(a=a, b=float(b), E=float(e), a_err=a * math.sqrt(max(var_log_a, 0.0)),
                       b_err=math.sqrt(max(cov[1, 1], 0.0)), E_err=math.sqrt(max(cov[2, 2], 0.0)),
                       rms_residual=math.sqrt(cost / len(y)))


@dataclass(frozen=True)
class PublishedModel:
    """One row of Cerebras-GPT's tables (Dey et al. 2023, arXiv 2304.03208; the standard
    parametrisation); loss is the Pile test loss in nats per token. The training FLOPs appear twice,
    with values 4 to 18% apart:

    - ``flops_training_table``: the paper's training table, which is also the training table of the
      Cerebras Model Zoo's Cerebras-GPT README (github.com/Cerebras/modelzoo, commit 502f4a2,
      modelzoo/transformers/pytorch/gpt3/configs/Cerebras_GPT/README.md). Its 1.3B, 2.7B and 6.7B
      values are the Model Zoo's four-digit counts (:data:`MODEL_ZOO_FLOPS`) rounded to two digits;
      :func:`model_zoo_flops` rounds to every row of it but 111M's (chapter 12).
    - ``flops_eval_table``: the paper's evaluation table, also in that README's 0-shot table. The
      Hugging Face model cards now print these values in their training table as well (the cards'
      history holds an edit titled "flops typo fix"). No source we found says how this column was
      counted (chapter 12 finds a count that rounds to it); it is the one the paper's scaling law is
      fitted against (chapter 06).

    Built in: 06_scaling
    """

    name: str
    n_layer: int
    d_model: int
    n_head: int
    tokens: float
    flops_eval_table: float
    flops_training_table: float
    pile_loss: float

    @property
    def config(self) -> GPTConfig:
        """The shape as a GPTConfig: GPT-2's architecture (d_ffn = 4 d_model, 50257-token vocabulary)
        and a 2048-token context, as every Cerebras-GPT model has."""
        return GPTConfig(n_layer=self.n_layer, n_embd=self.d_model, n_head=self.n_head, block_size=2048,
                         vocab_size=50257)


CEREBRAS_GPT = [PublishedModel(*row) for row in [
    # name, layers, d_model, heads, tokens, FLOPs (eval table), FLOPs (training table), Pile loss
    ("111M", 10, 768, 12, 2.22e9, 2.6e18, 2.5e18, 2.608),
    ("256M", 14, 1088, 17, 5.12e9, 1.3e19, 1.1e19, 2.349),
    ("590M", 18, 1536, 12, 1.18e10, 6.1e19, 5.3e19, 2.181),
    ("1.3B", 24, 2048, 16, 2.63e10, 2.8e20, 2.5e20, 1.997),
    ("2.7B", 32, 2560, 32, 5.30e10, 1.1e21, 9.8e20, 1.834),  # 32 heads of 80, as in the released
    # checkpoint's config.json (Cerebras/Cerebras-GPT-2.7B on Hugging Face: n_head 32, n_embd 2560)
    ("6.7B", 32, 4096, 32, 1.33e11, 6.3e21, 5.9e21, 1.704),
    ("13B", 40, 5120, 40, 2.57e11, 2.3e22, 2.1e22, 1.572),
]]

# The training FLOPs the Cerebras Model Zoo quotes to four digits, and the tokens of the run they are
# for (steps x batch x 2048 from the same config): P, Model Zoo R_1.7.0 (commit a3bf8f6, 2023-01-12),
# modelzoo/transformers/tf/gpt3/configs/params_gpt3_xl.yaml ("2.498e20 training FLOPs"),
# params_gpt3_2p7b.yaml ("9.767e20"), params_gpt3_6p7b.yaml ("5.853e21"). Their shapes, batches and
# steps are Cerebras-GPT 1.3B's, 2.7B's (32 heads) and 6.7B's.
MODEL_ZOO_FLOPS = {"1.3B": (2.498e20, 24_334 * 528 * 2048), "2.7B": (9.767e20, 49_041 * 528 * 2048),
                   "6.7B": (5.853e21, 62_522 * 1040 * 2048)}


def model_zoo_flops(config: GPTConfig, n_tokens: float, context: int | None = None) -> float:
    """Training FLOPs counted the way the Cerebras Model Zoo's quoted figures are
    (:data:`MODEL_ZOO_FLOPS`, reproduced within 0.02%): :func:`training_flops` (3 x every matrix
    product's forward FLOPs, attention's full T x T and the head included), plus the embedding lookup
    as a one-hot product in the forward pass and in its weight gradient (2 x 2 n_embd vocab per token;
    a one-hot input needs no gradient), plus the softmax at 3 FLOPs per attention score (Hoffmann et
    al. 2022's count), times 3 for training. The count is ours, fitted to their figures; the Model Zoo
    does not state its formula.

    Built in: 12_streaming
    """
    t = config.block_size if context is None else context
    softmax = 3.0 * config.n_layer * config.n_head * t  # per token, forward
    embedding = 4.0 * config.n_embd * config.vocab_size  # forward and weight gradient, per token
    return training_flops(config, n_tokens, context) + (3.0 * softmax + embedding) * n_tokens


def cerebras_gpt_published_law(flops):
    """The paper's fitted law: L(f) = (f / 5.984e22)^-0.0737 + 0.5066 (nats per token on the Pile)."""
    return np.power(np.asarray(flops, dtype=float) / 5.984e22, -0.0737) + 0.5066


# --- muP ---------------------------------------------------------------------------------------------

@torch.no_grad()
def activation_scales(model: GPT, idx: torch.Tensor) -> dict[str, float]:
    """The mean absolute value of a coordinate of the embeddings' output, of each block's output and
    of the logits, for the tokens ``idx`` (B, T): what a coordinate check watches.

    Built in: 06_scaling
    """
    seen: dict[str, float] = {}

    def keep(name):
        return lambda module, inputs, output: seen.__setitem__(name, output.abs().mean().item())

    modules: list[tuple[str, torch.nn.Module]] = [("embedding", model.transformer.drop)]
    modules += [(f"block {i}", block) for i, block in enumerate(model.transformer.h)]
    hooks = [module.register_forward_hook(keep(name)) for name, module in modules]
    try:
        logits, _ = model(idx)
    finally:
        for h in hooks:
            h.remove()
    return {**seen, "logits": logits.abs().mean().item()}


def coordinate_check(config: GPTConfig, widths, ids: torch.Tensor, steps: int = 5, lr: float = 1e-2,
                     batch_size: int = 8, seed: int = 0) -> dict[int, list[dict[str, float]]]:
    """The muP coordinate check: how large do activations get, after a few steps, as width grows?

    For each width (``config`` with ``n_embd`` replaced; heads as in ``config``), train from the same
    seed for ``steps`` AdamW steps at a constant learning rate ``lr`` (each parameter group at its own
    muP factor) on random windows of ``ids``, and record before training and after each step the
    mean absolute value of one coordinate of: the embeddings' output (``"embedding"``), each block's
    output (``"block 0"``, ...) and the logits (``"logits"``), on a fixed batch. Under a
    parametrisation that transfers across width these are flat in width; under the standard one
    the logits and the residual stream grow with it.

    Built in: 06_scaling
    """
    from minigpt.train import TokenWindows, parameter_groups, set_learning_rate

    widths = list(widths)
    if not widths or any(not isinstance(w, int) or w < 1 or w % config.n_head for w in widths):
        raise ValueError(f"widths={widths} must be positive multiples of n_head={config.n_head}")
    positive_int("steps", steps)
    if not lr > 0:
        raise ValueError(f"lr={lr} must be positive")
    windows = TokenWindows(ids, config.block_size, "the coordinate check's data")
    probe = windows.batch(batch_size, torch.Generator().manual_seed(seed + 1), "cpu")[0]
    out = {}
    for width in widths:
        torch.manual_seed(seed)
        model = GPT(replace(config, n_embd=width, dropout=0.0))
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=lr)
        set_learning_rate(optimizer, lr)
        records = [activation_scales(model, probe)]
        data = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = windows.batch(batch_size, data, "cpu")
            model(x, y)[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            records.append(activation_scales(model, probe))
        out[width] = records
    return out
