"""Command line: ``python -m minigpt train ...`` and ``python -m minigpt sample ...``.

Errors in what you ask for (a missing file, a too-short corpus, a checkpoint of another shape) end
the program with one line on stderr and exit status 2. Ctrl-C during training saves a checkpoint.

Built in: 04_pretraining
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  python -m minigpt train --data stories --tokenizer char --out runs/stories
  torchrun --nproc_per_node=2 -m minigpt train --data stories --batch-size 6 --out runs/stories-ddp
  python -m minigpt train --data input.txt --tokenizer char --n-layer 4 --n-head 4 --n-embd 128 \\
      --block-size 64 --batch-size 12 --max-steps 2000 --lr 1e-3 --min-lr 1e-4 --out runs/shakespeare
  python -m minigpt train --resume runs/shakespeare --max-steps 4000
  python -m minigpt sample --ckpt runs/stories --prompt "Once upon a time" --num-samples 3
"""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage too; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m minigpt", description="Train a GPT and sample from it.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a GPT on the story world or a text file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = t.add_argument_group("data")
    data.add_argument("--data", default="stories", help="'stories' (the story world) or a UTF-8 text file")
    data.add_argument("--stories", type=int, default=20000, help="how many stories, with --data stories")
    data.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    data.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    data.add_argument("--val-fraction", type=float, default=0.1)
    model = t.add_argument_group("model")
    model.add_argument("--n-layer", type=int, default=4)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--n-embd", type=int, default=128)
    model.add_argument("--block-size", type=int, default=64)
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                       help="biases in Linear layers and LayerNorms (GPT-2 has them; nanoGPT's recipes not)")
    opt = t.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=int, default=2000)
    opt.add_argument("--steps", type=int, default=None,
                     help="stop after this many steps in this run (the schedule still ends at --max-steps; "
                          "go on later with --resume)")
    opt.add_argument("--batch-size", type=int, default=12,
                     help="windows per micro-batch per process (the global batch is this x grad-accum x "
                          "processes)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--min-lr", type=float, default=1e-4)
    opt.add_argument("--warmup", type=int, default=100, help="warmup steps")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    run = t.add_argument_group("run")
    run.add_argument("--out", help="directory for checkpoint.pt and history.json")
    run.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (writes there too)")
    run.add_argument("--eval-interval", type=int, default=250)
    run.add_argument("--eval-batches", type=int, default=20)
    run.add_argument("--checkpoint-interval", type=int, default=500)
    run.add_argument("--seed", type=int, default=1337)
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="generate text from a trained checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--ckpt", required=True, help="a run directory or a checkpoint.pt")
    s.add_argument("--prompt", default="", help="text to continue (empty: start from nothing)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    return parser


def load_corpus(args) -> str:
    from minigpt.data import load_text, story_corpus

    if args.data == "stories":
        if args.stories < 1:
            raise ValueError(f"--stories={args.stories} must be at least 1")
        return story_corpus(args.stories, seed=0)
    return load_text(Path(args.data))


def cmd_train(args) -> None:
    """Train, in one process or, under torchrun, in each of several (data parallel)."""
    from minigpt import distributed

    with distributed.session(args.device):
        _train(args)


def _train(args) -> None:
    import torch

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be at least 1")
    from minigpt.data import train_val_split
    from minigpt.model import GPT, GPTConfig
    from minigpt.tokenizer import BPETokenizer, CharTokenizer
    from minigpt.train import TrainConfig, Trainer, load_checkpoint, tokenizer_from_dict

    config = TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                         min_lr=args.min_lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                         grad_clip=args.grad_clip, grad_accum=args.grad_accum,
                         eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                         checkpoint_interval=args.checkpoint_interval, seed=args.seed, device=args.device,
                         compile=args.compile, progress=not args.no_progress)
    text = load_corpus(args)
    train_text, val_text = train_val_split(text, args.val_fraction)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    elif args.tokenizer == "char":
        tokenizer = CharTokenizer.train(text)
    else:
        tokenizer = BPETokenizer.train(train_text, args.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text, **_allow(tokenizer)))
    val_ids = torch.tensor(tokenizer.encode(val_text, **_allow(tokenizer)))
    torch.manual_seed(args.seed)  # the initial weights depend on --seed alone
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size, vocab_size=tokenizer.vocab_size, dropout=args.dropout,
                          bias=args.bias))
    out = args.resume or args.out
    if out is None:
        raise ValueError("--out DIR is required (or --resume DIR)")
    trainer = Trainer(model, train_ids, val_ids, config, tokenizer=tokenizer, out_dir=out)
    if ckpt is not None:
        trainer.load(args.resume)
    if trainer.rank == 0:
        processes = f" x {trainer.world_size} processes" if trainer.world_size > 1 else ""
        print(f"training {model.num_parameters():,} parameters on {len(train_ids):,} tokens "
              f"({trainer.device}{processes}, {trainer.global_batch} windows a step); checkpoints in {out}",
              file=sys.stderr)
    try:
        history = trainer.train(args.steps)
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.step}; checkpoint saved in {out}", file=sys.stderr)
        raise SystemExit(130) from None
    last = history[-1]
    if trainer.rank == 0:
        print(f"step {last['step']}: train loss {last['train']:.4f}, val loss {last['val']:.4f}")


def _allow(tokenizer) -> dict:
    # a text file may contain "<|endoftext|>" literally: encode it as text, not as the special token
    return {"disallowed_special": ()} if hasattr(tokenizer, "special_tokens") else {}


def cmd_sample(args) -> None:
    import torch

    from minigpt.generate import generate
    from minigpt.train import model_from_checkpoint, pick_device

    model, tokenizer = model_from_checkpoint(args.ckpt, pick_device(args.device))
    ids = tokenizer.encode(args.prompt or "\n", **_allow(tokenizer))  # no prompt: start a new line
    out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, num_return_sequences=args.num_samples,
                   generator=torch.Generator(device=model.lm_head.weight.device).manual_seed(args.seed))
    for row in out.tolist():
        print(tokenizer.decode(row))
        print("-" * 40)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        (cmd_train if args.command == "train" else cmd_sample)(args)
    except ValueError as e:
        print(f"python -m minigpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
