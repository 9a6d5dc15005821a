"""Training speed on nanoGPT's character-level CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12).

- Throughput: the Trainer's step against a loop around ``transformers``' GPT2LMHeadModel of the same shape
  on the same windows, in interleaved rounds of 20 steps each (tokens/s from the median round; each
  ratio the median of the rounds' ratios), two ways:
  - the same settings: the same precision (bf16 autocast where the Trainer uses it by default, and again
    both in float32), the same optimizer (``minigpt.hardware.adamw``: torch's fused AdamW on a CPU) and
    the same clipping, so that the ratio compares the two models' implementations;
  - the first edition's loop: transformers' model as its documentation trains it, in float32 with
    torch's AdamW as it comes (a loop over the parameters on a CPU), the comparison this benchmark made
    before the speed work (its 1.28x).
- MFU: the Trainer's training FLOPs per second (chapter 03's count: 3x the forward pass's matrix
  products, attention's counted in full) over the 1024 x 1024 matmul peak measured in the same run:
  against the bf16 peak (under autocast the linear layers multiply in bf16), and against the float32
  peak, the denominator the first edition's benchmark used. Where the default step's time goes, by
  kind of operation (torch.profiler).
- The whole recipe, as the README runs it, in a fresh process: wall time from the process's start to
  its exit, right after the last checkpoint (imports, data, 2000 steps, evaluations and checkpoints
  included), and the validation loss of the final model over 150 batches. The same for the Trainer as
  of commit ead712c, before the work on its speed, when this repository's history holds it: runs of
  the two interleaved (``--runs`` of each), the ratio the median over the pairs run one after the other.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import SHARED_DATA, OtherWork, interleaved, median_ratio, write  # noqa: E402
from minigpt import hardware  # noqa: E402
from minigpt.data import story_corpus, train_val_split  # noqa: E402
from minigpt.model import GPT, GPTConfig, flops_per_token  # noqa: E402
from minigpt.tokenizer import CharTokenizer  # noqa: E402
from minigpt.train import TrainConfig, Trainer, measure_matmul_peak, model_from_checkpoint, parameter_groups  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "ead712c"  # the Trainer before its speed work
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
RECIPE = ["--tokenizer", "char", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64",
          "--batch-size", "12", "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4"]
TOKENS = 12 * 64  # per step


def hf_step(windows, vocab_size: int, bf16: bool, generator: torch.Generator, same: bool = True):
    """One step of a loop around transformers' GPT2LMHeadModel (GPT-2's own settings: its 'gelu_new'
    activation and SDPA attention). ``same``: with the Trainer's precision, optimizer and clipping;
    else the first edition's loop: float32, torch's AdamW and clipping as they come."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=64, vocab_size=vocab_size,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                    eos_token_id=0)).train()
    cpu = torch.device("cpu")
    if same:
        opt = hardware.adamw(parameter_groups(hf, 0.1), cpu, lr=1e-3, betas=(0.9, 0.99))
        foreach = opt.defaults["fused"] or None
    else:
        opt, foreach = torch.optim.AdamW(parameter_groups(hf, 0.1), lr=1e-3, betas=(0.9, 0.99)), None

    def step() -> None:
        x, y = windows.batch(12, generator, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and same):
            logits = hf(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0, foreach=foreach)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def throughput(ids: torch.Tensor, vocab_size: int, bf16: bool) -> tuple[dict[str, list[float]], Trainer]:
    """Seconds per step of the Trainer and of the transformers loops, in interleaved rounds; the Trainer."""
    config = TrainConfig(batch_size=12, lr=1e-3, min_lr=1e-4, max_steps=10**6, progress=False, device="cpu",
                         bf16="on" if bf16 else "off")
    torch.manual_seed(0)
    trainer = Trainer(GPT(GPTConfig(**SHAPE, vocab_size=vocab_size)), ids[:-10000], ids[-10000:], config)
    loops = {"ours": trainer.train_step,
             "same": hf_step(trainer.train_data, vocab_size, bf16, torch.Generator().manual_seed(0))}
    if bf16:  # in float32 the first edition's loop differs from "same" only in the optimizer's kernel
        loops["first"] = hf_step(trainer.train_data, vocab_size, bf16, torch.Generator().manual_seed(0),
                                 same=False)
    return interleaved(loops, blocks=9, per_block=20), trainer


# what a step's operations are, by torch's operator names
KINDS = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
         "attention kernels": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                               "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
         "GELU": ("aten::gelu", "aten::gelu_backward")}


def where_the_step_goes(trainer: Trainer, steps: int = 20) -> dict[str, float]:
    """Shares of the Trainer step's operator time (torch.profiler's self CPU time over ``steps`` steps),
    by kind of operation. The profiler adds a little to every operation, so the small ones' share is
    somewhat overstated."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            trainer.train_step()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        kind = next((k for k, names in KINDS.items() if event.key in names), "everything else")
        times[kind] = times.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(times.values())
    return {kind: times.get(kind, 0.0) / total for kind in [*KINDS, "everything else"]}


def peak(dtype: torch.dtype) -> float:
    """The best of three half-second measurements of 1024 x 1024 products (FLOP/s)."""
    return max(measure_matmul_peak(torch.device("cpu"), dtype, seconds=0.5) for _ in range(3))


def recipe(data: Path, out: Path, pythonpath: Path | None = None) -> dict:
    """Run the README's recipe in a fresh process; its wall time and the other work on the machine."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, "-m", "minigpt", "train", "--data", str(data), *RECIPE, "--out", str(out)]
    with OtherWork() as other:
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=pythonpath or ROOT)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the recipe failed: {done.stderr[-2000:]}")
    return {"seconds": seconds, "other_cores": other.cores, "stdout": done.stdout.strip()}


def val_loss(run: Path, text: str) -> float:
    """The final model's validation loss over 150 batches, as the Trainer evaluates (the same windows)."""
    model, tok = model_from_checkpoint(run)
    _, val_text = train_val_split(text, 0.1)
    val = torch.tensor(tok.encode(val_text))
    config = TrainConfig(batch_size=12, eval_batches=150, progress=False, device="cpu")
    return Trainer(model, val, val, config).evaluate()["val"]


def baseline_checkout(into: Path) -> Path | None:
    """The minigpt package as of BASELINE, unpacked into ``into``; None without the repository's history."""
    done = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE, "minigpt"], capture_output=True)
    if done.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(into, filter="data")
    where = subprocess.run([sys.executable, "-c", "import minigpt; print(minigpt.__file__)"], cwd=into,
                           env={**os.environ, "PYTHONPATH": str(into)}, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(into), where  # the old package, not this one
    return into


def end_to_end(text_path: Path, runs: int) -> tuple[list[dict], dict]:
    """The recipe by this Trainer and by BASELINE's, interleaved, ``runs`` times each: rows and all runs."""
    text = text_path.read_text(encoding="utf-8")
    results: dict[str, list[dict]] = {"baseline": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"baseline": baseline_checkout(Path(tmp) / "baseline"), "ours": None}
        for i in range(runs):  # baseline, ours, baseline, ours, ...
            for name, path in versions.items():
                if name == "ours" or path is not None:
                    out = Path(tmp) / f"{name}-{i}"
                    results[name].append({**recipe(text_path, out, path), "val": val_loss(out, text)})
    seconds = {k: [r["seconds"] for r in v] for k, v in results.items() if v}
    rows = [{"benchmark": "README recipe end to end, wall time (median)",
             "value": statistics.median(seconds["ours"]), "unit": "s",
             "target": f"process start to exit after the last checkpoint, {runs} runs"}]
    if "baseline" in seconds:
        rows += [{"benchmark": f"  the same, Trainer of {BASELINE} (median)",
                  "value": statistics.median(seconds["baseline"]), "unit": "s"},
                 {"benchmark": f"  ours / {BASELINE}, median of the {runs} pairs run one after the other",
                  "value": median_ratio(seconds["ours"], seconds["baseline"]), "unit": "x",
                  "target": "<= 0.7"}]
    ours, base = results["ours"][0], (results["baseline"] or [None])[0]
    rows.append({"benchmark": "  validation loss, 150 batches", "value": ours["val"], "unit": "nats",
                 "target": "<= 1.90 per character"})
    if base is not None:
        rows.append({"benchmark": f"  the same, {BASELINE}'s run", "value": base["val"], "unit": "nats"})
    kept = ("seconds", "other_cores", "val")
    return rows, {k: [{key: r[key] for key in kept} for r in v] for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of the whole recipe, each version")
    parser.add_argument("--no-recipe", action="store_true", help="skip the end-to-end runs")
    args = parser.parse_args()
    path = SHARED_DATA / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8") if path.is_file() else story_corpus(4000)
    tok = CharTokenizer.train(text)
    ids = torch.tensor(tok.encode(text))
    bf16 = hardware.bf16_native(torch.device("cpu"))
    per_token = flops_per_token(GPTConfig(**SHAPE, vocab_size=tok.vocab_size))["training"]
    rows, precisions = [], ([torch.bfloat16] if bf16 else []) + [torch.float32]
    peaks = {dtype: peak(dtype) for dtype in precisions}
    shares = {}
    for dtype in precisions:
        name = str(dtype)[6:]
        rounds, trainer = throughput(ids, tok.vocab_size, dtype == torch.bfloat16)
        rate = {k: TOKENS / statistics.median(v) for k, v in rounds.items()}
        default = dtype == precisions[0]  # the Trainer's default here: bf16 where the CPU has it
        rows += [
            {"benchmark": f"minigpt Trainer step, {name}", "value": rate["ours"], "unit": "tok/s",
             "target": "the default here" if default else ""},
            {"benchmark": f"  transformers GPT2LMHeadModel, same settings, {name}", "value": rate["same"],
             "unit": "tok/s"},
            {"benchmark": "  minigpt / transformers, same settings",
             "value": median_ratio(rounds["same"], rounds["ours"]), "unit": "x"},
        ]
        if "first" in rate:
            rows += [
                {"benchmark": "  transformers, the first edition's loop (float32, AdamW as it comes)",
                 "value": rate["first"], "unit": "tok/s"},
                {"benchmark": "  minigpt / transformers, the first edition's loop",
                 "value": median_ratio(rounds["first"], rounds["ours"]), "unit": "x", "target": ">= 1.6x"},
            ]
        for against in dict.fromkeys([dtype, torch.float32]):
            rows.append({"benchmark": f"  MFU against the {str(against)[6:]} peak",
                         "value": 100 * per_token * rate["ours"] / peaks[against], "unit": "%",
                         "target": ">= 65%" if default and against == torch.float32 else ""})
        if default:
            shares = where_the_step_goes(trainer)
            rows += [{"benchmark": f"  share of the step's operator time: {kind}", "value": 100 * share,
                      "unit": "%"} for kind, share in shares.items()]
    rows += [{"benchmark": f"measured {str(d)[6:]} matmul peak (n=1024)", "value": v / 1e9, "unit": "GFLOP/s"}
             for d, v in peaks.items()]
    extra = {}
    if not args.no_recipe and path.is_file():
        recipe_rows, extra = end_to_end(path, args.runs)
        rows += recipe_rows
    write("train", rows, {
        "recipe": "char level, 4 layers, 4 heads, 128 wide, block 64, batch 12, AdamW",
        "threads": torch.get_num_threads(), "bf16_native": bf16, "recipe_runs": extra,
        "notes": "same settings: both loops get the same precision (autocast), optimizer (fused AdamW) and "
                 "clipping; under autocast transformers' attention core runs in bf16 and minigpt's in "
                 "float32 (its own choice on a CPU); the first edition's loop: transformers in float32 with "
                 "torch's AdamW as it comes; steps in interleaved rounds, tokens/s from the median round, "
                 "ratios the median of the rounds' ratios; MFU against the bf16 and the float32 peak; "
                 "shares: torch.profiler's self CPU time by operator; other_cores: other processes' "
                 "CPU use during each recipe run, in cores"})


if __name__ == "__main__":
    main()
