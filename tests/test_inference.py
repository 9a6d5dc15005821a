"""wafer.inference: the released models' configs, the KV cache's layouts against WaferLLM's figures,
decode and prefill, and their energy per token."""

import dataclasses
import math
from collections import Counter

import pytest

from minigpt.model import LLAMA_STYLE, GPTConfig
from wafer.cost import gemm_cycles, gemv_cycles
from wafer.hardware import A100, H100, WSE2, WSE3
from wafer.inference import (
    decode,
    gpu_decode,
    gpu_prefill,
    joules_per_token,
    kv_rows,
    layout,
    min_wafers,
    prefill,
)
from wafer.shape import (
    LLAMA2_13B,
    LLAMA3_8B,
    QWEN2_72B,
    kv_bytes_per_token,
    kv_width,
    layer_params,
    params,
    products,
)
from wafer.target import Target


def _decode(shape, wafer, side, context, **kwargs):
    return decode(shape, Target(wafer, context=context), side, **kwargs)


def _prefill(shape, wafer, side, prompt, **kwargs):
    return prefill(shape, Target(wafer, context=prompt), side, **kwargs)


def test_shapes_count_the_published_parameters():
    assert params(LLAMA3_8B) == 8_030_261_248  # as the released weights count
    assert params(LLAMA2_13B) == 13_015_864_320
    assert kv_width(LLAMA3_8B) == 1024 and kv_bytes_per_token(LLAMA3_8B) == 2 * 32 * 1024 * 2
    assert kv_width(LLAMA2_13B) == 5120  # no grouped-query attention


def test_layout_by_hand_and_the_published_kv_capacity():
    l8 = layout(LLAMA3_8B, WSE2, 360)
    assert (l8.regions, l8.layers_per_region) == (4, 8)  # the 750 x 994 grid holds 2 x 2 squares of 360
    weights = -(-8 * layer_params(LLAMA3_8B) * 2 // 360**2)
    assert l8.weight_bytes_per_pe == weights and l8.free_bytes_per_pe == 49152 - weights
    assert l8.kv_bytes_per_token_per_pe == 8 * 2 * 3 * 2  # 1024 K (and V) columns over 360 PEs: 3 each
    assert l8.shift_tokens == 360 * l8.concat_tokens
    # WaferLLM's figures (concatenation 382 and 16, shift 137,548 and 6,168) are what 6 and 9 layers per
    # region give, within 5%
    published = ((LLAMA3_8B, 360, 6, 382, 137_548), (LLAMA2_13B, 375, 9, 16, 6_168))
    for config, side, layers, concat, shift in published:
        lay = layout(config, WSE2, side, layers_per_region=layers)
        assert abs(lay.concat_tokens / concat - 1) < 0.06 and abs(lay.shift_tokens / shift - 1) < 0.06


def test_decode_is_latency_and_prefill_is_compute():
    wide = _decode(LLAMA3_8B, WSE2, 360, 2048)
    compute = sum(gemv_cycles(WSE2, m, n, (360, 360), 2, "fp16").compute
                  for _, m, n in products(LLAMA3_8B))
    assert wide.weights_s > 5 * 32 * compute / WSE2.clock_hz  # mostly broadcasts and reductions
    assert wide.between_wafers_s == 0 and wide.tokens_per_s == 1 / wide.seconds
    assert wide.seconds == pytest.approx(wide.weights_s + wide.attention_s + wide.allreduce_s + wide.head_s)
    d = _decode(LLAMA3_8B, WSE2, 180, 2048)
    longer = _decode(LLAMA3_8B, WSE2, 180, 8192)
    assert longer.seconds > d.seconds  # attention grows with the context
    best = max((120, 180, 360), key=lambda p: _decode(LLAMA3_8B, WSE2, p, 2048).tokens_per_s)
    assert best == 180  # more PEs cut compute but lengthen every reduction
    for _, m, n in products(LLAMA3_8B):  # prefill uses Cannon's lockstep bound: within a cycle here
        g = gemm_cycles(WSE2, 512, n, m, 60, "interleave", "fp16")
        assert g.lockstep is not None and 0 <= g.lockstep - g.total <= 1
    p = _prefill(LLAMA3_8B, WSE2, 120, 512)
    assert p.tokens_per_s > _decode(LLAMA3_8B, WSE2, 120, 512).tokens_per_s
    assert _decode(LLAMA3_8B, WSE3, 180, 2048).tokens_per_s > d.tokens_per_s  # 8-wide FMACs


def test_decode_over_wafers_adds_the_crossings():
    seven = _decode(QWEN2_72B, WSE2, 360, 2048, wafers=7)
    crossing = 1e-6 + QWEN2_72B.n_embd * 2 * 8 / WSE2.io_bits_per_s  # a switch, and one token's activations
    assert seven.between_wafers_s == pytest.approx(6 * crossing)
    parts = seven.weights_s + seven.attention_s + seven.allreduce_s + seven.head_s + seven.between_wafers_s
    assert seven.seconds == pytest.approx(parts)
    with pytest.raises(ValueError, match="mode='training'"):
        decode(LLAMA3_8B, Target(WSE2, "training", 2048), 180)


def test_gpu_roofline():
    g = gpu_decode(LLAMA3_8B, H100, 2048)
    assert g.limit == "memory"
    nbytes = params(LLAMA3_8B) * 2 + 2048 * kv_bytes_per_token(LLAMA3_8B)
    assert g.memory_s == pytest.approx(nbytes / H100.hbm_bytes_per_s) and g.seconds == g.memory_s
    assert g.tokens_per_s == pytest.approx(H100.hbm_bytes_per_s / nbytes)
    assert gpu_decode(LLAMA3_8B, A100, 2048).tokens_per_s < g.tokens_per_s
    p = gpu_prefill(LLAMA3_8B, H100, 2048)
    assert p.limit == "compute" and p.tokens_per_s == pytest.approx(2048 / p.compute_s)


def test_bad_input():
    with pytest.raises(ValueError, match=r"side=0 must be an integer in \[1, 750\]"):
        layout(LLAMA3_8B, WSE2, 0)
    with pytest.raises(ValueError, match="Qwen2-72B does not fit in 360 x 360 regions on 1 WSE-2"):
        layout(QWEN2_72B, WSE2, 360)
    assert min_wafers(QWEN2_72B, WSE2, 360) == 7 and min_wafers(LLAMA3_8B, WSE2, 360) == 1
    with pytest.raises(ValueError, match="wafers=0"):
        _decode(LLAMA3_8B, WSE2, 180, 10, wafers=0)
    with pytest.raises(ValueError, match=r"32 layers at 4 per region of 360 x 360 need 1,036,800 PEs"):
        layout(LLAMA3_8B, WSE2, 360, layers_per_region=4)
    with pytest.raises(ValueError, match="context=0"):
        _decode(LLAMA3_8B, WSE2, 180, 0)
    with pytest.raises(ValueError, match="context=-5"):
        _prefill(LLAMA3_8B, WSE2, 180, -5)
    with pytest.raises(ValueError, match="prompt=0"):
        gpu_prefill(LLAMA3_8B, H100, 0)
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head"):
        GPTConfig(**LLAMA_STYLE, n_layer=2, n_embd=64, n_head=4, n_kv_head=3, mlp_hidden=128, vocab_size=100)


def _shift_by_hand(tokens, side):
    """The shift layout run token by token: a new token enters row 0, and each row that then holds
    more than the next passes its oldest token down."""
    rows = [[] for _ in range(side)]
    for t in range(tokens):
        rows[0].append(t)
        for r in range(side - 1):
            if len(rows[r]) > len(rows[r + 1]):
                rows[r + 1].append(rows[r].pop(0))
    where = {t: r for r, held in enumerate(rows) for t in held}
    return [where[t] for t in range(tokens)]


def test_kv_rows_equal_the_shift_run_token_by_token():
    for side in (1, 2, 3, 5, 8):
        for tokens in range(0, 4 * side + 3):
            rows = kv_rows(tokens, side)
            assert rows == _shift_by_hand(tokens, side), (tokens, side)
            counts = Counter(rows)
            assert max(counts.values(), default=0) == math.ceil(tokens / side)
            assert rows == sorted(rows, reverse=True)  # contiguous runs, the oldest at the bottom
    assert kv_rows(5, 3, "concat") == [0] * 5
    assert kv_rows(2, 4) == [3, 2]  # fewer tokens than rows: one each, from the bottom up


def test_kv_rows_agree_with_the_layouts_capacity():
    lay = layout(LLAMA3_8B, WSE2, 360)
    per_pe = lay.concat_tokens  # tokens a PE's free SRAM holds
    assert max(Counter(kv_rows(lay.shift_tokens, 360)).values()) == per_pe
    assert max(Counter(kv_rows(lay.shift_tokens + 1, 360)).values()) == per_pe + 1  # one more overflows
    assert max(Counter(kv_rows(per_pe, 360, "concat")).values()) == per_pe


def test_joules_per_token_is_power_times_seconds_per_token():
    d = _decode(LLAMA3_8B, WSE2, 180, 2048)
    assert joules_per_token(d, WSE2) == pytest.approx(WSE2.power_w * d.seconds)
    p = _prefill(LLAMA3_8B, WSE2, 360, 2048)
    assert joules_per_token(p, WSE2) == pytest.approx(WSE2.power_w * p.seconds / 2048)  # per prompt token
    seven = _decode(QWEN2_72B, WSE2, 360, 2048, wafers=7)
    assert joules_per_token(seven, WSE2, 7) == pytest.approx(7 * WSE2.power_w * seven.seconds)
    # a memory-bound GPU decode: power x bytes read per token / bandwidth, whatever the peak
    g = gpu_decode(LLAMA3_8B, H100, 2048)
    nbytes = params(LLAMA3_8B) * 2 + 2048 * kv_bytes_per_token(LLAMA3_8B)
    assert joules_per_token(g, H100) == pytest.approx(H100.power_w * nbytes / H100.hbm_bytes_per_s)
    faster = dataclasses.replace(H100, bf16_flops=2 * H100.bf16_flops)
    same = joules_per_token(gpu_decode(LLAMA3_8B, faster, 2048), faster)
    assert same == pytest.approx(H100.power_w * nbytes / H100.hbm_bytes_per_s)
    # a compute-bound prefill: power x FLOPs per prompt token / peak
    gp = gpu_prefill(LLAMA3_8B, H100, 2048)
    flops = 2 * params(LLAMA3_8B) + 4 * LLAMA3_8B.n_layer * LLAMA3_8B.n_embd * 2048
    assert joules_per_token(gp, H100) == pytest.approx(H100.power_w * flops / H100.bf16_flops)
    assert joules_per_token(gp, H100) < joules_per_token(g, H100)


def test_bad_input_to_kv_rows_and_energy():
    with pytest.raises(ValueError, match="tokens=-1 must be an integer >= 0"):
        kv_rows(-1, 4)
    with pytest.raises(ValueError, match="side=0"):
        kv_rows(3, 0)
    with pytest.raises(ValueError, match="kind='ring' is not one of"):
        kv_rows(3, 4, "ring")
    g = gpu_decode(LLAMA3_8B, H100, 2048)
    with pytest.raises(ValueError, match="machines=0"):
        joules_per_token(g, H100, 0)
    with pytest.raises(ValueError, match="H100 SXM has power_w=0"):
        joules_per_token(g, dataclasses.replace(H100, power_w=0))
