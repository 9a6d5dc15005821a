"""Started by tests/test_parallel_cli.py in processes (minigpt.parallel.launch.spawn)."""

import torch
from torch.distributed.tensor import DTensor

from minigpt.parallel.sharded import ShardedTrainer, ShardPlan
from minigpt.train import TrainConfig, load_checkpoint, model_from_checkpoint


def load_save_logits(rank: int, world: int, ckpt_dir: str, out_dirs: list[str], plans: list[tuple],
                     x: torch.Tensor) -> list[torch.Tensor]:
    """For each plan (fsdp, tensor_parallel): a sharded trainer loads the checkpoint in ckpt_dir,
    saves it again into its out_dir, and computes the logits of x. Returns the logits per plan."""
    ckpt = load_checkpoint(ckpt_dir)
    config = TrainConfig(**{**ckpt["train_config"], "progress": False})
    out = []
    for (fsdp, tp), out_dir in zip(plans, out_dirs):
        model, tokenizer = model_from_checkpoint(ckpt_dir)
        ids = torch.arange(200) % model.config.vocab_size  # not trained on: only load, save and run
        t = ShardedTrainer(model.train(), ids, ids, config, ShardPlan(fsdp, tp), tokenizer=tokenizer,
                           out_dir=out_dir)
        t.load(ckpt_dir)
        t.save()
        t.model.eval()
        with torch.no_grad():
            logits = t.model(x)[0]
        out.append(logits.full_tensor() if isinstance(logits, DTensor) else logits)
    return out
