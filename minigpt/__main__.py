"""Command line: ``python -m minigpt train ...`` and ``python -m minigpt sample ...``.

The defaults are TrainConfig's and GPTConfig's, except the model's size (:data:`CLI_SHAPE`).
``train --resume DIR`` rebuilds the run saved in DIR: the model's shape and the tokenizer come from its
checkpoint, and so do the data and training settings unless a flag changes them; a flag that was
given and contradicts the model or the tokenizer is an error. Errors in what you ask for (a missing
file, a too-short corpus, such a flag) end the program with one line on stderr and exit status 2.
Ctrl-C during training saves a checkpoint.

Built in: 04_pretraining
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from minigpt.checks import positive_int

EXAMPLES = """examples:
  python -m minigpt train --data stories --tokenizer char --out runs/stories
  torchrun --nproc_per_node=2 -m minigpt train --data stories --batch-size 6 --out runs/stories-ddp
  torchrun --nproc_per_node=2 -m minigpt train --fsdp --batch-size 6 --out runs/stories-fsdp
  torchrun --nproc_per_node=2 -m minigpt train --tensor-parallel 2 --out runs/stories-tp
  python -m minigpt train --data input.txt --tokenizer char --n-layer 4 --n-head 4 --n-embd 128 \\
      --block-size 64 --batch-size 12 --max-steps 2000 --lr 1e-3 --min-lr 1e-4 --out runs/shakespeare
  python -m minigpt train --resume runs/shakespeare --max-steps 4000
  python -m minigpt sample --ckpt runs/stories --prompt "Once upon a time" --num-samples 3
"""


# The model's shape when none is given: nanoGPT's character-level CPU recipe (GPTConfig's own defaults
# are GPT-2 small, too big for a CPU). Every other default comes from GPTConfig and TrainConfig.
CLI_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")  # GPTConfig fields
# TrainConfig fields that are the run's settings: a resumed run keeps the checkpoint's unless given
RUN_FLAGS = ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
             "grad_clip", "eval_interval", "eval_batches", "checkpoint_interval", "seed", "bf16")
DATA_FLAGS = ("data", "stories", "val_fraction", "tokenizer", "vocab_size")  # saved in the checkpoint


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage too; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls)}


def build_parser(bare: bool = False) -> argparse.ArgumentParser:
    """The command line's parser. With ``bare=True`` no option has a default, so that a parse holds
    only the options that were given: that is how :func:`parse` tells them apart.

    Built in: 04_pretraining
    """
    from minigpt.model import GPTConfig
    from minigpt.train import TrainConfig

    def default(value):
        return argparse.SUPPRESS if bare else value

    model_default = {k: default(v) for k, v in {**_field_defaults(GPTConfig), **CLI_SHAPE}.items()}
    train_default = {k: default(v) for k, v in _field_defaults(TrainConfig).items()}
    parser = OneLineParser(prog="python -m minigpt", description="Train a GPT and sample from it.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a GPT on the story world or a text file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = t.add_argument_group("data")
    data.add_argument("--data", default=default("stories"),
                      help="'stories' (the story world) or a UTF-8 text file")
    data.add_argument("--stories", type=int, default=default(20000),
                      help="how many stories, with --data stories")
    data.add_argument("--tokenizer", choices=["char", "bpe"], default=default("char"))
    data.add_argument("--vocab-size", type=int, default=default(1024), help="BPE vocabulary size")
    data.add_argument("--val-fraction", type=float, default=default(0.1))
    model = t.add_argument_group("model")
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        model.add_argument("--" + name.replace("_", "-"), type=int, default=model_default[name])
    model.add_argument("--dropout", type=float, default=model_default["dropout"])
    model.add_argument("--bias", action=argparse.BooleanOptionalAction, default=model_default["bias"],
                       help="biases in Linear layers and LayerNorms (GPT-2 has them; nanoGPT's recipes not)")
    opt = t.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=int, default=train_default["max_steps"])
    opt.add_argument("--steps", type=int, default=default(None),
                     help="stop after this many steps in this run (the schedule still ends at --max-steps; "
                          "go on later with --resume)")
    opt.add_argument("--batch-size", type=int, default=train_default["batch_size"],
                     help="windows per micro-batch per process (the global batch is this x grad-accum x "
                          "processes)")
    opt.add_argument("--grad-accum", type=int, default=train_default["grad_accum"],
                     help="micro-batches per step")
    opt.add_argument("--lr", type=float, default=train_default["lr"])
    opt.add_argument("--min-lr", type=float, default=train_default["min_lr"])
    opt.add_argument("--warmup", dest="warmup_steps", metavar="WARMUP", type=int,
                     default=train_default["warmup_steps"], help="warmup steps")
    opt.add_argument("--weight-decay", type=float, default=train_default["weight_decay"])
    opt.add_argument("--grad-clip", type=float, default=train_default["grad_clip"])
    run = t.add_argument_group("run")
    run.add_argument("--out", default=default(None), help="directory for checkpoint.pt and history.json")
    run.add_argument("--resume", metavar="DIR", default=default(None),
                     help="continue the run saved in DIR (writes there too), with its model, tokenizer, data "
                          "and settings; a flag given with it changes a setting, never the model")
    for name in ("eval_interval", "eval_batches", "checkpoint_interval", "seed"):
        run.add_argument("--" + name.replace("_", "-"), type=int, default=train_default[name])
    run.add_argument("--device", default=train_default["device"], choices=["auto", "cpu", "cuda", "mps"])
    run.add_argument("--bf16", default=train_default["bf16"], choices=["auto", "on", "off"],
                     help="bf16 autocast: auto = where the hardware multiplies bf16 natively; off = float32")
    run.add_argument("--threads", type=int, default=default(None),
                     help="CPU threads per process (default: torch's, one per core); on a machine busy with "
                          "other work, fewer can be much faster")
    run.add_argument("--compile", action="store_true", default=default(False), help="torch.compile the model")
    run.add_argument("--no-progress", action="store_true", default=default(False), help="no progress bar")
    shard = t.add_argument_group("sharding (under torchrun, in place of copying the model to every process)")
    shard.add_argument("--fsdp", action="store_true", default=default(False),
                       help="shard parameters, gradients and optimizer state over the data-parallel "
                            "processes (ZeRO-3, FSDP2)")
    shard.add_argument("--tensor-parallel", type=int, metavar="N", default=default(1),
                       help="split every block over N processes that read the same data (all of them; with "
                            "--fsdp, each group of N)")

    s = sub.add_parser("sample", help="generate text from a trained checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--ckpt", required=True, help="a run directory or a checkpoint.pt")
    s.add_argument("--prompt", default=default(""), help="text to continue (empty: start from nothing)")
    s.add_argument("--max-new-tokens", type=int, default=default(200))
    s.add_argument("--num-samples", type=int, default=default(1))
    s.add_argument("--temperature", type=float, default=default(0.8))
    s.add_argument("--top-k", type=int, default=default(None))
    s.add_argument("--top-p", type=float, default=default(None))
    s.add_argument("--seed", type=int, default=default(0))
    s.add_argument("--device", default=default("cpu"), choices=["auto", "cpu", "cuda", "mps"])
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed command line and the names of the options that were given on it (not defaulted).

    Built in: 04_pretraining
    """
    args = build_parser().parse_args(argv)
    bare = build_parser(bare=True).parse_args(argv)
    return args, set(vars(bare)) - {"command"}


def load_corpus(data: str, stories: int) -> str:
    from minigpt.data import load_text, story_corpus

    if data == "stories":
        return story_corpus(positive_int("--stories", stories), seed=0)
    return load_text(Path(data))


def cmd_train(args, given: set[str]) -> None:
    """Train, in one process or, under torchrun, in each of several (data parallel)."""
    from minigpt import distributed

    with distributed.session(args.device):
        _train(args, given)


def _flag(name: str) -> str:
    return "--" + {"warmup_steps": "warmup"}.get(name, name).replace("_", "-")


def _resumed(args, given: set[str], ckpt: dict):
    """The model's shape, the tokenizer, the data settings and the training settings of the run in
    the checkpoint; ValueError if a flag that was given contradicts the model or the tokenizer."""
    from minigpt.model import GPTConfig
    from minigpt.train import TrainConfig, tokenizer_from_dict

    shape = GPTConfig(**ckpt["model_config"])
    tokenizer = tokenizer_from_dict(ckpt.get("tokenizer"))
    if tokenizer is None:
        raise ValueError(f"cannot resume {args.resume}: its checkpoint holds no tokenizer")
    # the data settings saved with the checkpoint (a checkpoint written by a Trainer alone has none:
    # then the flags say where the data is)
    data = {"tokenizer": ckpt["tokenizer"]["kind"], "vocab_size": tokenizer.vocab_size,
            **{k: getattr(args, k) for k in ("data", "stories", "val_fraction")},
            **ckpt.get("data_settings", {})}
    theirs = {**{k: getattr(shape, k) for k in MODEL_FLAGS}, "tokenizer": data["tokenizer"]}
    if data["tokenizer"] == "bpe":
        theirs["vocab_size"] = data["vocab_size"]
    for name in sorted(given & set(theirs), key=list(theirs).index):
        if getattr(args, name) != theirs[name]:
            value = getattr(args, name)
            shown = ("--bias" if value else "--no-bias") if name == "bias" else f"{_flag(name)} {value}"
            raise ValueError(f"cannot resume {args.resume}: {shown} contradicts its checkpoint, which has "
                             f"{name}={theirs[name]}; leave the flag out (the checkpoint fixes the model "
                             f"and its tokenizer)")
    data.update({k: getattr(args, k) for k in ("data", "stories", "val_fraction") if k in given})
    settings = {**ckpt["train_config"], **{k: getattr(args, k) for k in RUN_FLAGS if k in given}}
    config = TrainConfig(**{**settings, "device": args.device, "compile": args.compile,
                            "progress": not args.no_progress})
    return shape, tokenizer, data, config


def _train(args, given: set[str]) -> None:
    import torch

    if args.steps is not None:
        positive_int("--steps", args.steps)
    if args.threads is not None:
        torch.set_num_threads(positive_int("--threads", args.threads))
    from minigpt.distributed import rank_and_world

    plan = None
    if args.fsdp or args.tensor_parallel != 1:  # checked before the data is made
        from minigpt.parallel.sharded import ShardedTrainer, ShardPlan

        plan = ShardPlan(args.fsdp, args.tensor_parallel)
        plan.check_world(rank_and_world()[1])
    from minigpt.data import train_val_split
    from minigpt.model import GPT, GPTConfig
    from minigpt.tokenizer import BPETokenizer, CharTokenizer
    from minigpt.train import TrainConfig, Trainer, load_checkpoint

    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        shape, tokenizer, data, config = _resumed(args, given, ckpt)
        text = load_corpus(data["data"], data["stories"])
        train_text, val_text = train_val_split(text, data["val_fraction"])
    else:
        data = {k: getattr(args, k) for k in DATA_FLAGS}
        if args.data != "stories":
            data["data"] = str(Path(args.data).resolve())  # so that --resume finds it from anywhere
        config = TrainConfig(**{k: getattr(args, k) for k in RUN_FLAGS}, device=args.device,
                             compile=args.compile, progress=not args.no_progress)
        text = load_corpus(args.data, args.stories)
        train_text, val_text = train_val_split(text, args.val_fraction)
        if args.tokenizer == "char":
            tokenizer = CharTokenizer.train(text)
        else:
            tokenizer = BPETokenizer.train(train_text, args.vocab_size)
        shape = GPTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS}, vocab_size=tokenizer.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text, **_allow(tokenizer)))
    val_ids = torch.tensor(tokenizer.encode(val_text, **_allow(tokenizer)))
    torch.manual_seed(config.seed)  # the initial weights depend on --seed alone
    model = GPT(shape)
    out = args.resume or args.out
    if out is None:
        raise ValueError("--out DIR is required (or --resume DIR)")
    saved = {"tokenizer": tokenizer, "out_dir": out, "data_settings": data}
    trainer = (Trainer(model, train_ids, val_ids, config, **saved) if plan is None
               else ShardedTrainer(model, train_ids, val_ids, config, plan, **saved))
    if ckpt is not None:
        trainer.load(args.resume)
    if trainer.rank == 0:
        print(_announcement(trainer, plan, len(train_ids), out), file=sys.stderr)
    try:
        history = trainer.train(args.steps)
    except KeyboardInterrupt:
        kept = "checkpoint saved" if plan is None else "the last checkpoint kept"  # see ShardedTrainer.save
        print(f"interrupted at step {trainer.step}; {kept} in {out}", file=sys.stderr)
        raise SystemExit(130) from None
    last = history[-1]
    if trainer.rank == 0:
        print(f"step {last['step']}: train loss {last['train']:.4f}, val loss {last['val']:.4f}")


def _announcement(trainer, plan, tokens: int, out: str) -> str:
    """The line a run starts with: what it trains, and how (device, threads, precision, processes)."""
    import torch

    how = [str(trainer.device)]
    if trainer.device.type == "cpu":
        threads = torch.get_num_threads()
        how.append(f"{threads} thread{'s' if threads != 1 else ''}")
    how.append("bf16 autocast" if trainer.use_bf16 else "float32")
    if trainer.world_size > 1:
        how.append(f"{trainer.world_size} processes" + (f", {plan}" if plan is not None else ""))
    return (f"training {trainer.model.num_parameters():,} parameters on {tokens:,} tokens ({', '.join(how)}, "
            f"{trainer.global_batch} windows a step); checkpoints in {out}")


def _allow(tokenizer) -> dict:
    # a text file may contain "<|endoftext|>" literally: encode it as text, not as the special token
    return {"disallowed_special": ()} if hasattr(tokenizer, "special_tokens") else {}


def cmd_sample(args) -> None:
    import torch

    from minigpt.generate import generate
    from minigpt.train import model_from_checkpoint, pick_device

    model, tokenizer = model_from_checkpoint(args.ckpt, pick_device(args.device))
    if tokenizer is None:
        raise ValueError(f"{args.ckpt} holds a model trained without a tokenizer: sample needs text")
    ids = tokenizer.encode(args.prompt or "\n", **_allow(tokenizer))  # no prompt: start a new line
    out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, num_return_sequences=args.num_samples,
                   generator=torch.Generator(device=model.lm_head.weight.device).manual_seed(args.seed))
    for row in out:  # one prompt: a (num_samples, T) tensor
        print(tokenizer.decode(row.tolist()))
        print("-" * 40)


def main(argv: Sequence[str] | None = None) -> int:
    args, given = parse(argv)
    try:
        if args.command == "train":
            cmd_train(args, given)
        else:
            cmd_sample(args)
    except ValueError as e:
        print(f"python -m minigpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
