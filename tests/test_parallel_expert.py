"""Expert parallelism in real processes (gloo) against the same mixture of experts on one process:
outputs, loss and gradients of an MoE layer and of an MoE GPT, and the bytes each rank sends."""

import pytest
import torch
from parallel_expert import all_checks

from minigpt.model import GPTConfig
from minigpt.moe import MoE
from minigpt.parallel.expert import ExpertParallelMoE, shard_experts
from minigpt.parallel.launch import spawn

# float64 throughout: expert parallelism does the same arithmetic as one process, except that sums
# over ranks (the router's gradient, the balancing loss's statistics) add per-rank partial sums, in
# another order. In float64 that moves the last bits only: 1e-12 absolute on values of order 1.
TOL = 1e-12


def test_expert_parallel_equals_one_process():
    # one process group for every case (starting processes costs seconds): 3 ranks, so that each rank
    # sends to two others; 1 expert per rank with top-1 (Switch's routing), 2 per rank with top-2
    # and top-3 (a token's experts spread over several ranks)
    world, layer_cases = 3, [(3, 1), (6, 2), (6, 3)]
    results = spawn(all_checks, world, layer_cases, 0, timeout=120)
    for rank, result in enumerate(results):
        for case, layer in zip(layer_cases, result["layers"]):
            for key in ("y", "loss", "aux", "router_grad", "expert_grad"):
                assert layer[key] < TOL, (rank, case, key, layer[key])
            # bytes given to the all_to_all calls = the formula from the one-process routing
            assert layer["sent_bytes"] == layer["formula_bytes"] > 0, (rank, case)
        gpt = result["gpt"]
        # GPT.forward takes the cross-entropy in float32 (logits.float()): the mean of the ranks'
        # losses and the one-process loss differ in float32's last bits, ~1e-7 on a loss of ~3.4
        assert gpt["loss"] < 1e-6 and gpt["grad"] < TOL, (rank, gpt)
        assert gpt["experts_per_layer"] == 2 and gpt["layers"] == 2
        # the chapter's own check, minigpt.parallel.expert.compare_with_one_process, agrees
        package = result["package"]
        assert package["loss"] < 1e-6 and package["grad"] < TOL, (rank, package)
        assert sum(package["traffic"][0]) == 2 * 8 * 2  # 2 sequences of 8 tokens, top-2: all sent
    # over all ranks, the traffic is twice the rows that leave their rank (out, then back)
    for i, (_, top_k) in enumerate(layer_cases):
        layers = [r["layers"][i] for r in results]
        leaving = sum(layer["leaving"] for layer in layers)
        assert sum(layer["sent_bytes"] for layer in layers) == 2 * leaving * 12 * 8
        # every pair is sent somewhere (its own rank included): dropless
        assert sum(sum(layer["sent_rows"]) for layer in layers) == world * 3 * 5 * top_k


def test_bad_splits_are_refused():
    moe = MoE(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=10, n_expert=4))
    with pytest.raises(ValueError, match="n_expert=4 must be divisible by world=3"):
        ExpertParallelMoE(moe, 0, 3)
    with pytest.raises(ValueError, match="rank=2 must be in"):
        ExpertParallelMoE(moe, 2, 2)
    with pytest.raises(ValueError, match="no MoE layer"):
        shard_experts(torch.nn.Linear(2, 2), 0, 2)
