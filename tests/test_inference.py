"""wafer.inference: model shapes, the KV cache's layouts against WaferLLM's figures, decode and prefill."""

import pytest

from wafer.cost import gemm_cycles, gemv_cycles
from wafer.hardware import A100, H100, WSE2, WSE3
from wafer.inference import (
    decode,
    gpu_decode,
    gpu_prefill,
    layout,
    min_wafers,
    prefill,
)
from wafer.shape import LLAMA2_13B, LLAMA3_8B, QWEN2_72B, Shape
from wafer.target import Target


def _decode(shape, wafer, side, context, **kwargs):
    return decode(shape, Target(wafer, context=context), side, **kwargs)


def _prefill(shape, wafer, side, prompt, **kwargs):
    return prefill(shape, Target(wafer, context=prompt), side, **kwargs)


def test_shapes_count_the_published_parameters():
    assert LLAMA3_8B.params == 8_030_261_248  # as the released weights count
    assert LLAMA2_13B.params == 13_015_864_320
    assert LLAMA3_8B.d_kv == 1024 and LLAMA3_8B.kv_bytes_per_token() == 2 * 32 * 1024 * 2
    assert LLAMA2_13B.d_kv == 5120  # no grouped-query attention


def test_layout_by_hand_and_the_published_kv_capacity():
    l8 = layout(LLAMA3_8B, WSE2, 360)
    assert (l8.regions, l8.layers_per_region) == (4, 8)  # the 750 x 994 grid holds 2 x 2 squares of 360
    weights = -(-8 * LLAMA3_8B.layer_params * 2 // 360**2)
    assert l8.weight_bytes_per_pe == weights and l8.free_bytes_per_pe == 49152 - weights
    assert l8.kv_bytes_per_token_per_pe == 8 * 2 * 3 * 2  # 1024 K (and V) columns over 360 PEs: 3 each
    assert l8.shift_tokens == 360 * l8.concat_tokens
    # WaferLLM's figures (concatenation 382 and 16, shift 137,548 and 6,168) are what 6 and 9 layers per
    # region give, within 5%
    published = ((LLAMA3_8B, 360, 6, 382, 137_548), (LLAMA2_13B, 375, 9, 16, 6_168))
    for shape, side, layers, concat, shift in published:
        lay = layout(shape, WSE2, side, layers_per_region=layers)
        assert abs(lay.concat_tokens / concat - 1) < 0.06 and abs(lay.shift_tokens / shift - 1) < 0.06


def test_decode_is_latency_and_prefill_is_compute():
    wide = _decode(LLAMA3_8B, WSE2, 360, 2048)
    compute = sum(gemv_cycles(WSE2, m, n, (360, 360), 2, "fp16").compute
                  for _, m, n in LLAMA3_8B.products())
    assert wide.weights_s > 5 * 32 * compute / WSE2.clock_hz  # mostly broadcasts and reductions
    assert wide.between_wafers_s == 0 and wide.tokens_per_s == 1 / wide.seconds
    assert wide.seconds == pytest.approx(wide.weights_s + wide.attention_s + wide.allreduce_s + wide.head_s)
    d = _decode(LLAMA3_8B, WSE2, 180, 2048)
    longer = _decode(LLAMA3_8B, WSE2, 180, 8192)
    assert longer.seconds > d.seconds  # attention grows with the context
    best = max((120, 180, 360), key=lambda p: _decode(LLAMA3_8B, WSE2, p, 2048).tokens_per_s)
    assert best == 180  # more PEs cut compute but lengthen every reduction
    for _, m, n in LLAMA3_8B.products():  # prefill uses Cannon's lockstep bound: within a cycle here
        g = gemm_cycles(WSE2, 512, n, m, 60, "interleave", "fp16")
        assert g.lockstep is not None and 0 <= g.lockstep - g.total <= 1
    p = _prefill(LLAMA3_8B, WSE2, 120, 512)
    assert p.tokens_per_s > _decode(LLAMA3_8B, WSE2, 120, 512).tokens_per_s
    assert _decode(LLAMA3_8B, WSE3, 180, 2048).tokens_per_s > d.tokens_per_s  # 8-wide FMACs


def test_decode_over_wafers_adds_the_crossings():
    seven = _decode(QWEN2_72B, WSE2, 360, 2048, wafers=7)
    crossing = 1e-6 + QWEN2_72B.d_model * 2 * 8 / WSE2.io_bits_per_s  # a switch, and one token's activations
    assert seven.between_wafers_s == pytest.approx(6 * crossing)
    parts = seven.weights_s + seven.attention_s + seven.allreduce_s + seven.head_s + seven.between_wafers_s
    assert seven.seconds == pytest.approx(parts)
    with pytest.raises(ValueError, match="mode='training'"):
        decode(LLAMA3_8B, Target(WSE2, "training", 2048), 180)


def test_gpu_roofline():
    g = gpu_decode(LLAMA3_8B, H100, 2048)
    assert g.limit == "memory"
    nbytes = LLAMA3_8B.params * 2 + 2048 * LLAMA3_8B.kv_bytes_per_token()
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
        Shape("odd", 2, 64, 4, 3, 128, 100)
