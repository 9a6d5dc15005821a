"""The planner: its counts against torch and published tables, its costs against the formulas they come
from, its choices against Megatron-LM's published configurations."""

import math

import pytest
import torch

from minigpt.model import GPT, Block, GPTConfig
from minigpt.parallel import planner as pl

# Narayanan et al. 2021 (arXiv:2104.04473), Table 1: parameters (billions), heads, hidden size, layers,
# tensor-parallel size, pipeline-parallel size, GPUs, batch (sequences), achieved TFLOP/s per A100.
# All with 2048-token sequences and a 51,200-token vocabulary.
MEGATRON_TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def megatron_config(heads, hidden, layers):
    return GPTConfig(n_layer=layers, n_head=heads, n_embd=hidden, block_size=2048, vocab_size=51200)


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_equals_the_built_model(bias):
    for config in (GPTConfig(bias=bias), GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16,
                                                   vocab_size=50, bias=bias)):
        with torch.device("meta"):  # shapes without memory or initialisation
            model = GPT(config)
        assert pl.parameter_count(config) == model.num_parameters()


def test_parameter_count_reproduces_megatron_table_1():
    for billions, heads, hidden, layers, *_ in MEGATRON_TABLE_1:
        n = pl.parameter_count(megatron_config(heads, hidden, layers)) / 1e9
        assert round(n, 1) == pytest.approx(billions, abs=0.051), billions  # the table rounds to 0.1B


def test_model_state_reproduces_zero_paper_figure_1():
    # Rajbhandari et al. 2020 (arXiv:1910.02054), Figure 1: 7.5B parameters, 64 data-parallel GPUs,
    # K = 12: 120 GB, 31.4 GB, 16.6 GB and 1.9 GB per GPU for the baseline and ZeRO stages 1-3
    published = [120.0, 31.4, 16.6, 1.9]
    ours = [pl.model_state_bytes(7.5e9, z, 64) / 1e9 for z in range(4)]
    assert [round(x, 1) for x in ours] == [120.0, 31.4, 16.6, 1.9] == published


def saved_bytes(module, x):
    """Bytes of the tensors autograd keeps for the backward pass (each storage once, parameters not)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(kept.values())


def test_layer_activations_match_korthikanti_formula_measured():
    torch.manual_seed(0)
    s, b, h, a = 32, 2, 64, 4
    config = GPTConfig(n_layer=1, n_head=a, n_embd=h, block_size=s, dropout=0.1)
    block = Block(config).to(torch.bfloat16)
    block.attn.use_sdpa = False  # the attention written out keeps its scores, as the formula counts
    measured = saved_bytes(block, torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True))
    formula = pl.layer_activation_bytes(config, b)
    assert formula == s * b * h * (34 + 5 * a * s / h)
    # What torch keeps beyond the formula, each named: the two residual dropouts' masks in 16 bits
    # (the formula counts one byte), the LayerNorms' mean and 1/std per token (16-bit here), the mask
    # of fully masked rows (one byte per query and head)
    named = 2 * s * b * h + 2 * 2 * s * b * 2 + b * a * s
    assert measured == formula + named


def test_recomputation_keeps_the_layer_input_and_costs_a_forward():
    c = pl.GPT3_175B
    assert pl.layer_activation_bytes(c, 1, recompute=True) == 2 * 2048 * 12288
    assert pl.layer_activation_bytes(c, 1, tensor=8) == pl.layer_activation_bytes(c, 1) / 8
    blocks = c.n_layer * (24 * c.n_embd**2 + 4 * c.block_size * c.n_embd)
    assert pl.training_flops_per_token(c, True) - pl.training_flops_per_token(c) == blocks


def test_data_parallel_plan_costs():
    c, gpus, tokens = pl.GPT2_SMALL, 16, 64 * 1024
    p = pl.plan(c, gpus, tokens, tensor=1, pipeline=1, zero=0, micro_batch=2)
    rate = pl.H100.peak_flops * pl.EFFICIENCY
    assert p.data == 16 and p.micro_batches == 2 and p.tensor_s == 0 and p.pipeline_s == 0 and p.bubble == 0
    assert math.isclose(p.compute_s, pl.training_flops_per_token(c) * tokens / gpus / rate)
    grads = 2 * pl.parameter_count(c)
    assert math.isclose(p.data_s, pl.H100.network.ring_allreduce(grads, 16))  # 2 nodes: InfiniBand
    assert math.isclose(p.step_s, p.compute_s + p.data_s)
    assert math.isclose(p.mfu, pl.EFFICIENCY * p.compute_s / p.step_s)


def test_zero_stages_communication():
    # ZeRO-0/1: one all-reduce a step; ZeRO-2: a reduce-scatter per micro-batch and one all-gather;
    # ZeRO-3: per micro-batch, two all-gathers of the weights and a reduce-scatter (ZeRO paper: 3 x
    # the weights where an all-reduce moves 2 x, at one micro-batch)
    c, gpus, tokens = pl.CEREBRAS_GPT_13B, 64, 256 * 2048
    link, n = pl.H100.network, 2 * pl.parameter_count(c) / 2  # 16-bit weights over t = 2
    for m, b in ((1, 8), (8, 1)):  # 256 sequences over 32 replicas: 8 each
        got = [pl.plan(c, gpus, tokens, 2, 1, zero=z, micro_batch=b).data_s for z in range(4)]
        half = link.ring_allreduce(n, 32) / 2
        assert got[0] == got[1] and math.isclose(got[0], 2 * half)
        assert math.isclose(got[2], (m + 1) * half) and math.isclose(got[3], 3 * m * half)


def test_tensor_and_pipeline_plan_costs():
    c = pl.CEREBRAS_GPT_13B
    p = pl.plan(c, 64, 1024 * 2048, tensor=4, pipeline=4, zero=1, micro_batch=2, recompute=True)
    s, h, b, m = 2048, 5120, 2, 1024 // (4 * 2)
    assert (p.data, p.micro_batches) == (4, m)
    per_layer = 6 * pl.H100.nvlink.ring_allreduce(2 * s * b * h, 4)  # two forward, two backward, two again
    assert math.isclose(p.tensor_s, m * 10 * per_layer)  # 40 layers over 4 stages
    assert math.isclose(p.pipeline_s, m * 2 * pl.H100.network.message(2 * s * b * h))  # 16 GPUs a stage
    assert p.bubble == 3 / (m + 3)
    slot = (p.compute_s + p.tensor_s + p.pipeline_s) / m
    assert math.isclose(p.bubble_s, 3 * slot) and math.isclose(p.step_s, (m + 3) * slot + p.data_s)
    assert math.isclose(p.hardware_flops / p.model_flops, pl.training_flops_per_token(c, True)
                        / pl.training_flops_per_token(c))


def test_memory_falls_with_each_zero_stage_and_with_recomputation():
    args = (pl.GPT3_175B, 1024, 1536 * 2048)
    mem = [pl.plan(*args, tensor=8, pipeline=8, zero=z).memory_bytes for z in range(4)]
    assert mem == sorted(mem, reverse=True) and len(set(mem)) == 4
    assert (pl.plan(*args, tensor=8, pipeline=8, recompute=True).activation_bytes
            < pl.plan(*args, tensor=8, pipeline=8).activation_bytes / 5)


def test_planner_picks_megatrons_layout_and_throughput():
    # Without ZeRO (as Megatron-LM ran in 2021) the planner picks the published tensor x pipeline split
    # for the 76.1B and 145.6B models, and its estimate of the published configurations' throughput
    # (recomputation on, Megatron's FLOP count) is within 25% of the measurement for every row
    for billions, heads, hidden, layers, t, pp, gpus, batch, tflops in MEGATRON_TABLE_1:
        config = megatron_config(heads, hidden, layers)
        ours = pl.plan(config, gpus, batch * 2048, t, pp, zero=0, recompute=True, cluster=pl.A100)
        assert abs(ours.hardware_flops / 1e12 / tflops - 1) < 0.25, billions
        if billions in (76.1, 145.6):
            best = pl.best_plan(config, gpus, batch * 2048, pl.A100, zero_stages=(0,))
            assert (best.tensor, best.pipeline) == (t, pp)


def test_best_plan_for_175b():
    with pytest.raises(ValueError, match="no plan fits in 80 GB"):
        pl.best_plan(pl.GPT3_175B, 8, 1536 * 2048)
    best = pl.best_plan(pl.GPT3_175B, 1024, 1536 * 2048)
    assert best.fits and best.gpus == 1024 and best.tensor == 8
    every = pl.plans(pl.GPT3_175B, 1024, 1536 * 2048)
    assert best.step_s == min(p.step_s for p in every if p.fits)


def test_bad_input_is_named():
    c = pl.GPT2_SMALL
    with pytest.raises(ValueError, match="whole nodes"):
        pl.plans(c, 12, 1024 * 64)
    with pytest.raises(ValueError, match="sequences"):
        pl.plans(c, 8, 1000)
    with pytest.raises(ValueError, match="efficiency"):
        pl.plans(c, 8, 1024 * 64, efficiency=0.0)
    with pytest.raises(ValueError, match="tensor=3"):
        pl.plan(c, 24, 1024 * 48, tensor=3, pipeline=1)
    with pytest.raises(ValueError, match="zero=4"):
        pl.plan(c, 8, 1024 * 64, tensor=1, pipeline=1, zero=4)
    with pytest.raises(ValueError, match="pipeline=16"):
        pl.plan(c, 16, 1024 * 64, tensor=1, pipeline=16)
    with pytest.raises(ValueError, match="GPTConfig"):
        pl.plans("gpt2", 8, 1024)  # type: ignore[arg-type]
