"""wafer.emulate: a minigpt on the mesh simulator gives torch's logits and tokens, at the cost model's
cycles."""

import dataclasses

import numpy as np
import pytest
import torch

from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from wafer.emulate import Emulator, program
from wafer.hardware import KERNEL_DTYPE, TOY
from wafer.mesh import MeshError
from wafer.stages import pipeline_stages
from wafer.strategies import strips
from wafer.target import Target
from wafer.workload import gpt_workload


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=40)).eval()


def test_logits_equal_torchs_for_several_prompts(model):
    em = Emulator(model)
    for prompt in ([3], [7, 1, 30], [0, 39, 12, 5]):
        em.reset()
        with torch.no_grad():
            ref = model(torch.tensor([prompt]))[0][0].double().numpy()
        for j, token in enumerate(prompt):
            logits = em.step(token)
            # float64 on the mesh, float32 in torch: 1e-4 is the bound, measured ~1e-7
            assert np.abs(logits - ref[j]).max() < 1e-4
    simulated, predicted = em.cycles()
    assert 0.85 < simulated / predicted < 1.15
    # the cost model of the same program, computed without the mesh, phase for phase
    em.reset()
    em.step(3)
    em.step(9)
    token = em.phases[len(em.phases) // 2:]  # the second token's phases
    assert [(p.name, p.stage, p.predicted) for p in token] == program(model.config, em.placement, 1)


def test_greedy_generation_gives_the_same_tokens(model):
    prompt = [4, 8, 15]
    ours = Emulator(model).generate(prompt, 20)
    theirs = generate(model, prompt, max_new_tokens=20, do_sample=False)[0].tolist()
    assert ours == theirs and len(ours) == 23


def test_weights_and_cache_sit_in_the_stages_sram(model):
    em = Emulator(model)
    # by default one column of FLOP-proportional strips, for the whole context, in the kernels' fp32
    assert em.placement.target == Target(TOY, "inference", 32, "fp32")
    assert em.placement.strategy == "FLOP-proportional" and len({(r.x, r.w) for r in em.rects}) == 1
    for r in em.rects:
        used = [em.mesh.sram_used((x, y)) for y in range(r.y, r.y1) for x in range(r.x, r.x1)]
        assert max(used) <= TOY.sram_bytes_per_pe
    first = em.rects[1]  # a block: its first column holds the keys and values of every position
    assert em.mesh.load((first.x, first.y), "K").shape[0] == model.config.block_size
    tiny = dataclasses.replace(TOY, sram_bytes_per_pe=256)
    stages = pipeline_stages(gpt_workload(model.config, context=32, dtype=KERNEL_DTYPE))
    cramped = strips(stages, Target(tiny, context=32, dtype=KERNEL_DTYPE), columns=1)
    with pytest.raises(MeshError, match="SRAM overflow at PE"):
        Emulator(model, cramped)


def test_bad_input(model):
    em = Emulator(model)
    with pytest.raises(ValueError, match=r"token=40 must be in \[0, 40\)"):
        em.step(40)
    stages = pipeline_stages(gpt_workload(model.config, context=32, dtype=KERNEL_DTYPE))
    two_columns = strips(stages, Target(TOY, context=32, dtype=KERNEL_DTYPE), columns=2)
    with pytest.raises(ValueError, match="stacked in one column of strips"):
        Emulator(model, two_columns)
    with pytest.raises(ValueError, match="prompt is empty"):
        em.generate([], 3)
    mup = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=40, mup_base_width=16))
    with pytest.raises(ValueError, match=r"parametrisation; this model uses muP \(mup_base_width=16\)"):
        Emulator(mup)
