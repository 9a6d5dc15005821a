"""wafer.emulate: a minigpt on the mesh simulator gives torch's logits and tokens, at the cost model's
cycles."""

import dataclasses

import numpy as np
import pytest
import torch

from minigpt.generate import generate
from minigpt.model import GPT, LLAMA_STYLE, GPTConfig
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


# --- a LLaMA-style model: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, an untied head -----
SMALL = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=40)


def perturbed(config: GPTConfig) -> GPT:
    """A model away from its initialisation: norm scales spread around 1, and queries and keys 8 times
    larger, so that attention is far from uniform and positions and groups move the logits."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    qk = config.n_embd + config.kv_heads * config.head_dim  # the rows of the queries and the keys
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith(".weight"):
                p.normal_(1.0, 0.3)
            if name.endswith("c_attn.weight"):
                p[:qk] *= 8
    return model


def even(config: GPTConfig):
    """One column of strips on a 16 x 18 grid, 8 rows for each block: every block of every vector is
    the same size (the 8 pairs of key dimensions, 1 pair a row), so no PE finishes before another and
    the cost model counts each phase to the cycle."""
    grid = TOY.with_grid(16, 18, name="16 x 18")
    stages = pipeline_stages(gpt_workload(config, context=config.block_size, dtype=KERNEL_DTYPE))
    return strips(stages, Target(grid, context=config.block_size, dtype=KERNEL_DTYPE), columns=1,
                  areas=[1, 8, 8, 1])


@pytest.fixture(scope="module")
def llama():
    return perturbed(GPTConfig(**LLAMA_STYLE, **SMALL, n_kv_head=2))


def run(model, placement, prompt) -> tuple[Emulator, float]:
    """The prompt through the emulator; its largest difference from torch's float32 logits, and that each
    token's phases are program's, simulated to the cycle."""
    em = Emulator(model, placement)
    ours = np.stack([em.step(token) for token in prompt])
    with torch.no_grad():
        theirs = model(torch.tensor([prompt]))[0][0].double().numpy()
    n = len(em.phases) // len(prompt)
    for position in range(len(prompt)):
        token = em.phases[position * n:(position + 1) * n]
        assert [(p.name, p.stage, p.predicted) for p in token] == program(model.config, placement, position)
        assert [p.simulated for p in token] == [p.predicted for p in token]
    return em, float(np.abs(ours - theirs).max())


def test_a_llama_style_model_gives_torchs_logits_at_the_cost_models_cycles(llama):
    em, worst = run(llama, even(llama.config), [7, 1, 30, 12, 5, 22])
    # float64 on the mesh, float32 in torch: the GPT-2 test's bound, 1e-4, for logits of at most 0.3
    # (float32's rounding leaves ~5e-8, measured)
    assert worst < 1e-4
    names = [p.name for p in em.phases[:len(em.phases) // 6]]
    assert names.count("rmsnorm") == 5 and "layernorm" not in names
    # the tolerance is far below what RoPE or the groups change: without rotation, or with each query
    # head reading the other key-value head, torch's own logits move by more than 1e-2
    prompt = torch.tensor([[7, 1, 30, 12, 5, 22]])
    with torch.no_grad():
        ref = llama(prompt)[0]
        unrotated = GPT(dataclasses.replace(llama.config, positions="none")).eval()
        unrotated.load_state_dict(llama.state_dict())
        assert (unrotated(prompt)[0] - ref).abs().max() > 1e-2
        swapped = GPT(llama.config).eval()
        swapped.load_state_dict(llama.state_dict())
        for block in swapped.transformer.h:  # the two key-value heads' rows of k and of v exchanged
            w = block.attn.c_attn.weight
            w[32:] = torch.cat([w[40:48], w[32:40], w[56:64], w[48:56]])
        assert (swapped(prompt)[0] - ref).abs().max() > 1e-2


def test_a_llama_style_model_generates_minigpts_greedy_tokens(llama):
    prompt = [4, 8, 15]
    ours = Emulator(llama, even(llama.config)).generate(prompt, 12)
    theirs = generate(llama, prompt, max_new_tokens=12, do_sample=False)[0].tolist()
    assert ours == theirs and len(ours) == 15


def test_grouped_query_attention_halves_the_kv_cache_in_sram(llama):
    def cache_bytes(em):  # K and V on each PE of each block's first column (4 bytes an element)
        return {em.mesh.load(pe, "K").size * 4 + em.mesh.load(pe, "V").size * 4
                for i in (1, 2) for pe in em._first(i)}

    mha = GPTConfig(**LLAMA_STYLE, **SMALL)  # the same model with a key-value head for every query head
    placement = even(llama.config)
    # 32 positions x (K and V) x 4 bytes, for 2 key dimensions a PE with 2 key-value heads (16 dimensions
    # over 8 rows), 4 with 4
    assert cache_bytes(Emulator(llama, placement)) == {32 * 2 * 2 * 4} == {512}
    assert cache_bytes(Emulator(GPT(mha).eval(), placement)) == {32 * 2 * 4 * 4} == {1024}


@pytest.mark.parametrize("options", [
    dict(n_kv_head=1),  # GPT-2 with one key-value head for its four query heads
    dict(bias=False, mlp="swiglu", positions="none"),  # LayerNorm without its shift, no positions
    dict(norm="rmsnorm", positions="rope", tie_embeddings=False),  # with biases, every head its own kv
], ids=["gpt2-mqa", "swiglu-no-bias-no-positions", "rope-rmsnorm-biased"])
def test_each_option_runs_on_its_own(options):
    model = perturbed(GPTConfig(**SMALL, **options))
    _, worst = run(model, even(model.config), [3, 17, 9])
    assert worst < 1e-4  # as above


def test_options_the_emulator_cannot_take(llama):
    config = GPTConfig(**LLAMA_STYLE, **SMALL, n_kv_head=2)
    for options, message in [
            (dict(qk_norm=True), r"qk_norm=True \(valid: False\)"),
            (dict(rope_scaling=(8.0, 1.0, 4.0, 16)), r"rope_scaling=\(8.0, 1.0, 4.0, 16\) \(valid: None\)"),
            (dict(head_size=16), r"heads of n_embd / n_head = 8: this model has head_size=16"),
            (dict(qkv_bias=True), r"qkv_bias=True with bias=False"),
            (dict(n_expert=2), r"n_expert=2 \(a mixture of experts\)")]:
        with pytest.raises(ValueError, match=message):
            Emulator(GPT(dataclasses.replace(config, **options)))
        with pytest.raises(ValueError, match=message):
            program(dataclasses.replace(config, **options), even(config), 0)
    # by default 15 rows a block: more than the 8 pairs of key dimensions a PE of the first column needs
    with pytest.raises(ValueError, match="32 x 15 rectangle has more rows than the 8 pairs of key dim"):
        Emulator(llama)
