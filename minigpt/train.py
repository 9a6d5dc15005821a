"""Pretraining: random windows, AdamW, warmup + cosine, clipping, accumulation, evaluation,
checkpoints that resume exactly (and loading a model and its tokenizer from one), progress, and MFU;
and the loss of each token and of whole sequences, with a ratio's standard error.

Built in: 04_pretraining
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minigpt import hardware
from minigpt.checks import positive_int
from minigpt.distributed import mean_over_ranks, rank_and_world
from minigpt.files import atomic_write, load_tensors
from minigpt.hardware import bf16_native, keep_freed_memory, measure_matmul_peak, pick_device
from minigpt.model import GPT, GPTConfig, flops_per_token
from minigpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"


@dataclass
class TrainConfig:
    """How to train. Defaults follow nanoGPT's small character-level CPU recipe.

    Built in: 04_pretraining
    """

    max_steps: int = 2000
    batch_size: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    grad_accum: int = 1
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 500  # 0: only at the end (and on Ctrl-C)
    seed: int = 1337
    device: str = "auto"  # "auto", "cpu", "cuda", "mps"
    bf16: str = "auto"  # "auto": where the hardware multiplies bf16 natively (bf16_native); "on"; "off"
    compile: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_interval", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr; got min_lr={self.min_lr}, lr={self.lr}")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device={self.device!r} must be one of auto, cpu, cuda, mps")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16={self.bf16!r} must be one of auto, on, off")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``.

    Built in: 04_pretraining
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


class TokenWindows:
    """Random windows of ``block_size + 1`` tokens from a token stream: inputs and next-token targets."""

    def __init__(self, ids: torch.Tensor, block_size: int, name: str = "data"):
        if ids.dim() != 1:
            raise ValueError(f"{name}: token ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
        if len(ids) < block_size + 1:
            raise ValueError(f"{name} has {len(ids)} tokens, fewer than block_size + 1 = {block_size + 1}: "
                             f"use more text or a smaller block size")
        self.ids, self.block_size = ids.long(), block_size

    def batch(self, batch_size: int, generator: torch.Generator, device,
              shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows. With ``shard=(rank, world)``, the generator draws ``world x
        batch_size`` window starts (the global batch, the same in every process) and only rows
        ``rank x batch_size`` to ``(rank + 1) x batch_size`` are read."""
        rank, world = shard
        starts = torch.randint(len(self.ids) - self.block_size, (batch_size * world,), generator=generator)
        starts = starts[rank * batch_size : (rank + 1) * batch_size]
        offsets = torch.arange(self.block_size + 1)
        windows = self.ids[starts[:, None] + offsets]  # (B, T + 1)
        return windows[:, :-1].to(device), windows[:, 1:].to(device)


def tokenizer_to_dict(tokenizer: Tokenizer) -> dict:
    """The tokenizer as plain data for a checkpoint: its kind and its :meth:`to_text`.

    Built in: 04_pretraining
    """
    return {"kind": "char" if isinstance(tokenizer, CharTokenizer) else "bpe", "text": tokenizer.to_text()}


def tokenizer_from_dict(d: dict | None) -> Tokenizer | None:
    """The tokenizer that :func:`tokenizer_to_dict` saved; None for a model trained without one.

    Built in: 04_pretraining
    """
    if d is None:
        return None
    cls: type[Tokenizer] = CharTokenizer if d["kind"] == "char" else BPETokenizer
    return cls.from_text(d["text"], "the checkpoint's tokenizer")


def load_checkpoint(path: str | Path, device="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data only, never pickled code.

    Built in: 04_pretraining
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    return load_tensors(path, "minigpt checkpoint", device)


def model_from_checkpoint(path: str | Path, device="cpu") -> tuple[GPT, Tokenizer | None]:
    """The trained model (in eval mode) and its tokenizer (None if it was trained without one).

    Built in: 04_pretraining
    """
    ckpt = load_checkpoint(path, device)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tokenizer_from_dict(ckpt["tokenizer"])


@torch.no_grad()
def token_losses(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log q(y[b, t] | x[b, :t+1])`` in nats for every position, as a (B, T) tensor on the CPU
    (float32); 0 where ``y`` is -100. The model is run in eval mode (no dropout).

    Built in: 04_pretraining
    """
    was_training = model.training
    model.eval()
    try:
        device = model.lm_head.weight.device
        logits, _ = model(x.to(device))
        losses = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-100,
                                 reduction="none")
    finally:
        model.train(was_training)
    return losses.cpu()


def sequence_nats(model: GPT, sequences, scored=None, batch_size: int = 32) -> torch.Tensor:
    """The loss in nats of the last ``scored[i]`` tokens of each sequence of token ids (default: every
    token after the first), each predicted from all the tokens before it, as a float64 tensor.

    Sequences of up to ``block_size + 1`` tokens are batched by length and padded on the right; under
    causal attention the padding cannot change the predictions before it, and it is not scored.

    Built in: 04_pretraining
    """
    positive_int("batch_size", batch_size)
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    counts = [s.numel() - 1 for s in seqs] if scored is None else [int(n) for n in scored]
    block = model.config.block_size
    if len(counts) != len(seqs):
        raise ValueError(f"{len(counts)} scored counts for {len(seqs)} sequences")
    for i, (s, n) in enumerate(zip(seqs, counts)):
        if s.dim() != 1 or not 2 <= len(s) <= block + 1 or not 1 <= n < len(s):
            raise ValueError(f"sequence {i} has shape {tuple(s.shape)} and {n} scored tokens: each must be "
                             f"1-D with 2 to block_size + 1 = {block + 1} tokens, scoring 1 to all but one")
    out = torch.zeros(len(seqs), dtype=torch.float64)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = max(len(seqs[i]) for i in rows) - 1
        x = torch.zeros(len(rows), length, dtype=torch.long)
        y = torch.full((len(rows), length), -100, dtype=torch.long)
        for r, i in enumerate(rows):
            t = len(seqs[i]) - 1
            x[r, :t], y[r, t - counts[i]:t] = seqs[i][:-1], seqs[i][-counts[i]:]
        out[rows] = token_losses(model, x, y).double().sum(1)
    return out


def ratio_estimate(numerators, denominators) -> tuple[float, float]:
    """``sum(a) / sum(b)`` over independent pairs (a_i, b_i), and its standard error by the delta
    method: ``sqrt(sum(r_i**2) / (n (n - 1))) / mean(b)`` with residuals ``r_i = a_i - ratio b_i``.
    With nats and characters per story, it is the loss per character and its error bar.

    Built in: 04_pretraining
    """
    a = torch.as_tensor(numerators, dtype=torch.float64).flatten()
    b = torch.as_tensor(denominators, dtype=torch.float64).flatten()
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two or more (numerator, denominator) pairs; got {len(a)} and {len(b)}")
    if b.sum() <= 0:
        raise ValueError(f"the denominators must have a positive sum, not {b.sum().item()}")
    ratio, n = (a.sum() / b.sum()).item(), len(a)
    return ratio, ((a - ratio * b).square().sum() / (n * (n - 1))).sqrt().item() / b.mean().item()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices and embeddings only (not on biases and
    LayerNorm gains), and each group's factor on the scheduled learning rate (``lr_scale``): 1 except
    for the hidden matrices of a muP model (:meth:`minigpt.model.GPT.lr_multipliers`). Parameters
    with ``requires_grad=False`` are left out.

    Built in: 04_pretraining
    """
    multipliers = getattr(model, "lr_multipliers", None)  # a GPT's; a classifier has none
    scales = multipliers() if multipliers is not None else {}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (weight_decay if p.dim() >= 2 else 0.0, scales.get(name, 1.0))
            groups.setdefault(key, []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters (everything has requires_grad=False)")
    return [{"params": ps, "weight_decay": decay, "lr_scale": scale} for (decay, scale), ps in groups.items()]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each parameter group to ``lr`` times its ``lr_scale`` (see :func:`parameter_groups`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _as_batches(data, block_size: int, name: str):
    """A 1-D tensor of token ids becomes random windows; anything with a ``batch(batch_size, generator,
    device)`` method (such as :class:`minigpt.finetune.Examples`) is used as it is."""
    if hasattr(data, "batch"):
        return data
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids or have a batch() method, "
                        f"not {type(data).__name__}")
    return TokenWindows(data, block_size, name)


class Trainer:
    """Trains a GPT on token streams; ``out_dir`` (optional) receives checkpoints and the loss history.

    ``train_ids`` and ``val_ids`` may instead be example sets (chapter 05's finetuning data); only the
    parameters that require gradients are optimised (a frozen body, LoRA). ``data_settings`` (plain
    data: how the data was made) is saved in every checkpoint, so that a resumed command line can
    make the same data again.

    Built in: 04_pretraining
    """

    def __init__(self, model: GPT, train_ids: torch.Tensor, val_ids: torch.Tensor, config: TrainConfig,
                 tokenizer=None, out_dir: str | Path | None = None, data_settings: dict | None = None):
        self.config = config
        self.data_settings = data_settings
        self.rank, self.world_size = rank_and_world()
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        block = model.config.block_size
        self.train_data = _as_batches(train_ids, block, "the training split")
        self.val_data = _as_batches(val_ids, block, "the validation split")
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        groups = parameter_groups(model, config.weight_decay)
        self.optimizer = hardware.adamw(groups, self.device, lr=config.lr, betas=(config.beta1, config.beta2))
        self.use_bf16 = config.bf16 == "on" or (config.bf16 == "auto" and bf16_native(self.device))
        if self.device.type == "cpu":
            keep_freed_memory()
        self.step = 0
        self.tokens = 0  # input tokens processed by all processes together (for tokens/s)
        self.history: list[dict] = []
        torch.manual_seed(config.seed)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        # (this process's share of every global batch, of how many shares): one per process under DDP;
        # a sharded run's tensor-parallel ranks share one (minigpt.parallel.sharded.ShardedTrainer)
        self.data_shard = (self.rank, self.world_size)
        self.parallel = self.wrap(self.model)
        self.forward = torch.compile(self.parallel) if config.compile else self.parallel

    def wrap(self, model: GPT) -> torch.nn.Module:
        """Under a process group, DistributedDataParallel starts every copy from rank 0's weights and,
        during backward, averages the gradients across processes in buckets as they become ready."""
        cuda = self.device.type == "cuda"
        return model if self.world_size == 1 else DistributedDataParallel(
            model, device_ids=[self.device.index] if cuda else None)

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step, all processes together: batch_size x grad_accum x data shares."""
        return self.config.batch_size * self.config.grad_accum * self.data_shard[1]

    # -- one step ------------------------------------------------------------------------------------
    def _batch(self, data, batch_size: int, generator: torch.Generator):
        """This process's share of a global batch of ``batch_size`` windows per data share."""
        if isinstance(data, TokenWindows):
            return data.batch(batch_size, generator, self.device, shard=self.data_shard)
        share, shares = self.data_shard
        rows = slice(share * batch_size, (share + 1) * batch_size)
        return tuple(t[rows] for t in data.batch(batch_size * shares, generator, self.device))

    def _loss(self, x, y) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            return self.forward(x, y)[1]

    def accumulate_gradients(self) -> float:
        """Forward and backward over ``grad_accum`` micro-batches; afterwards each parameter's
        ``.grad`` is the gradient of the mean loss over the global batch (averaged across processes).
        Returns this process's mean loss."""
        return self._accumulate().item()

    def _accumulate(self) -> torch.Tensor:  # a tensor, read only when the loss is reported
        c = self.config
        self.model.train()
        total = torch.zeros((), device=self.device)
        ddp = self.parallel if isinstance(self.parallel, DistributedDataParallel) else None
        for micro in range(c.grad_accum):
            x, y = self._batch(self.train_data, c.batch_size, self.data_generator)
            self.tokens += x.numel() * self.data_shard[1]
            # all-reduce once per step: no gradient sync on the micro-batches before the last
            with ddp.no_sync() if ddp is not None and micro < c.grad_accum - 1 else contextlib.nullcontext():
                loss = self._loss(x, y) / c.grad_accum
                loss.backward()
            total += loss.detach()
        return total

    def train_step(self) -> float:
        """One optimizer step; returns its mean loss (reading it waits for the step to finish)."""
        return self._step().item()

    def _step(self) -> torch.Tensor:
        c = self.config
        set_learning_rate(self.optimizer, learning_rate(self.step, c))
        total = self._accumulate()
        if c.grad_clip > 0:
            self.clip_gradients(c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def clip_gradients(self, max_norm: float) -> None:
        fused = self.optimizer.defaults["fused"]  # then foreach works too (torch's default: off on a CPU)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=fused or None)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over ``eval_batches`` windows of each split, drawn by a fixed-seed generator so
        that every evaluation sees the same windows and training's random stream is untouched.
        Under a process group each process evaluates its share and the means are averaged."""
        self.model.eval()
        out = {}
        for name, data in (("train", self.train_data), ("val", self.val_data)):
            g = torch.Generator().manual_seed(self.config.seed + 1)
            losses = [self._loss(*self._batch(data, self.config.batch_size, g))
                      for _ in range(self.config.eval_batches)]
            out[name] = mean_over_ranks(sum(torch.stack(losses).tolist()) / len(losses), self.device)
        self.model.train()
        return out

    # -- the loop ------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict]:
        """Train until ``max_steps`` (or for ``steps`` more). Ctrl-C saves a checkpoint, then re-raises.

        Built in: 04_pretraining
        """
        c = self.config
        end = c.max_steps if steps is None else min(c.max_steps, self.step + steps)
        # at most one redraw a second: a notebook receives every redraw as a message, and a flood of
        # them can crowd out the kernel's other messages
        bar = tqdm(total=end, initial=self.step, disable=not c.progress or self.rank != 0, desc="training",
                   unit="step", mininterval=1.0)
        running, start, start_tokens, shown = None, time.perf_counter(), self.tokens, time.perf_counter()
        try:
            while self.step < end:
                loss = self._step()
                running = loss if running is None else 0.9 * running + 0.1 * loss  # a tensor: no wait
                if not bar.disable and (time.perf_counter() - shown >= 1.0 or self.step == end):  # redraws
                    bar.set_postfix(loss=f"{running.item():.3f}", lr=f"{learning_rate(self.step - 1, c):.2e}",
                                    refresh=False)
                    shown = time.perf_counter()
                bar.update(1)
                if self.step % c.eval_interval == 0 or self.step == end:
                    last = loss.item()  # waits for the device to finish the steps timed
                    elapsed = time.perf_counter() - start
                    record = {"step": self.step, "loss": mean_over_ranks(last, self.device),
                              **self.evaluate(), "lr": learning_rate(self.step - 1, c),
                              "tokens_per_s": (self.tokens - start_tokens) / elapsed}
                    self.history.append(record)
                    start, start_tokens = time.perf_counter(), self.tokens
                if self.out_dir and c.checkpoint_interval and self.step % c.checkpoint_interval == 0:
                    self.save()
        except KeyboardInterrupt:
            if self.out_dir:
                self.save()
            raise
        finally:
            bar.close()
        if self.out_dir:
            self.save()
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dicts(self) -> tuple[dict, dict]:
        """The model's and the optimizer's state dicts, as one process holds them."""
        return self.model.state_dict(), self.optimizer.state_dict()

    def load_state_dicts(self, model: dict, optimizer: dict) -> None:
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(optimizer)

    def state(self) -> dict:
        model, optimizer = self.state_dicts()
        return {
            "format": "minigpt-checkpoint 1",
            "model": model,
            "optimizer": optimizer,
            "step": self.step,
            "model_config": asdict(self.model.config),
            "train_config": asdict(self.config),
            "world_size": self.world_size,  # the global batch was batch_size x grad_accum x world_size
            "rng": {"torch": torch.get_rng_state(), "data": self.data_generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "tokenizer": tokenizer_to_dict(self.tokenizer) if self.tokenizer is not None else None,
            "history": self.history,
            **({"data_settings": self.data_settings} if self.data_settings is not None else {}),
        }

    def save(self, out_dir: str | Path | None = None) -> Path:
        """Write checkpoint.pt and history.json into ``out_dir`` atomically; return the checkpoint's path.
        Under a process group only rank 0 writes (every process makes the state: a sharded one
        gathers it).

        Built in: 04_pretraining
        """
        out = Path(out_dir) if out_dir is not None else self.out_dir
        if out is None:
            raise ValueError("no out_dir: pass one to save() or to the Trainer")
        state = self.state()
        if self.rank != 0:
            return out / CHECKPOINT
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(out / CHECKPOINT, buf.getvalue())
        atomic_write(out / HISTORY, json.dumps(self.history, indent=1))
        return out / CHECKPOINT

    def load(self, path: str | Path) -> None:
        """Continue from a checkpoint: model, optimizer, step, random states, history.

        The checkpoint's model shape must equal this trainer's model; ValueError names what differs.

        Built in: 04_pretraining
        """
        ckpt = load_checkpoint(path, self.device)
        ours, theirs = asdict(self.model.config), ckpt["model_config"]
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if diff:
            what = ", ".join(f"{k}={a} in the checkpoint but {b} here" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume: the checkpoint's model differs ({what})")
        self.load_state_dicts(ckpt["model"], ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint of torch's loop AdamW continues fused
            group["fused"] = group["fused"] or self.optimizer.defaults["fused"]
        self.step = ckpt["step"]
        self.history = list(ckpt.get("history", []))
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        self.data_generator.set_state(ckpt["rng"]["data"].cpu())
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])

    # -- efficiency ----------------------------------------------------------------------------------
    @property
    def matmul_dtype(self) -> torch.dtype:
        """The precision the forward pass multiplies in: bf16 under autocast, else float32."""
        return torch.bfloat16 if self.use_bf16 else torch.float32

    def mfu(self, tokens_per_s: float, peak_flops: float | None = None) -> float:
        """Model FLOPs utilisation: training FLOPs per second over the measured matmul peak."""
        if peak_flops is None:
            peak_flops = measure_matmul_peak(self.device, self.matmul_dtype)
        per_token = flops_per_token(self.model.config)["training"]
        return per_token * tokens_per_s / peak_flops
