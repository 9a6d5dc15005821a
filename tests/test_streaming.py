"""wafer.streaming: weight streaming's step, SwarmX, the training-time estimator, and bad input."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.model import GPTConfig
from minigpt.scaling import CEREBRAS_GPT
from wafer.hardware import H100, WSE2, Cluster
from wafer.shape import Shape
from wafer.stages import pipeline_stages
from wafer.streaming import (
    SWARMX_LEVEL_S,
    gpu_training_days,
    swarmx_levels,
    swarmx_seconds,
    training_time,
    weight_streaming,
)
from wafer.workload import gpt_workload

CONFIG = {m.name: m.config for m in CEREBRAS_GPT}


def test_swarmx_levels_and_time_grow_with_log_n():
    assert [swarmx_levels(Cluster(WSE2, n)) for n in (1, 2, 3, 4, 5, 16, 17)] == [0, 1, 2, 2, 3, 4, 5]
    assert swarmx_levels(Cluster(WSE2, 16, swarmx_fanout=4)) == 2
    nbytes = 1e9
    stream = nbytes * 8 / WSE2.io_bits_per_s
    times = [swarmx_seconds(nbytes, Cluster(WSE2, 2 ** k)) for k in range(8)]
    for k, t in enumerate(times):  # the stream at one system's rate, and a latency per level: log2 N
        assert t == pytest.approx(stream + k * SWARMX_LEVEL_S, rel=1e-12)
    assert all(b > a for a, b in zip(times, times[1:]))


def test_the_step_by_hand():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=256)
    cluster = Cluster(WSE2, 2)
    s = weight_streaming(config, cluster, batch=8, context=128, micro_batch=2, recompute=False)
    stages = pipeline_stages(gpt_workload(config, context=128, dtype="fp16"))
    tokens, peak, io = 2 * 128, WSE2.peak_flops("fp16", cores=WSE2.pes), WSE2.io_bits_per_s / 8
    h0 = stages[1]
    assert s.forward[1] == max(h0.flops * tokens / peak, h0.params * 2 / io)
    assert s.backward[1] == max(2 * h0.flops * tokens / peak, h0.params * 2 / io)
    assert s.micro_batches == 2 and s.stages == ["embed", "h0", "h1", "head"]
    assert s.step == pytest.approx(2 * (s.forward.sum() + s.backward.sum()) + s.boundary, rel=1e-12)
    assert s.tokens_per_s == 8 * 128 / s.step
    assert s.limit == "I/O"  # 256 tokens per micro-batch: far too few to hide the stream (peak / io ~ 44,000)
    recomputed = weight_streaming(config, cluster, batch=8, context=128, micro_batch=2)
    assert recomputed.backward[1] == max(3 * h0.flops * tokens / peak, h0.params * 2 / io)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["111M", "590M", "1.3B"]), systems=st.sampled_from([1, 2, 4, 8]),
       per_system=st.sampled_from([8, 24, 48]), recompute=st.booleans())
def test_weight_streaming_is_never_faster_than_the_compute_bound(name, systems, per_system, recompute):
    # one sequence of each of these fits beside two layers, so every draw is a step
    s = weight_streaming(CONFIG[name], Cluster(WSE2, systems), systems * per_system, 2048,
                         recompute=recompute)
    assert s.step >= s.compute_bound and 0 < s.utilisation <= (0.75 if recompute else 1.0)
    assert s.sram_bytes <= WSE2.sram_bytes(WSE2.pes)


def test_large_micro_batches_hide_the_stream():
    c = Cluster(WSE2, 4)
    small = weight_streaming(CONFIG["1.3B"], c, 528, 2048, micro_batch=1)
    large = weight_streaming(CONFIG["1.3B"], c, 528, 2048)
    intensity = WSE2.peak_flops("fp16", cores=WSE2.pes) / (WSE2.io_bits_per_s / 8)  # tokens per micro-batch
    assert small.limit == "I/O" and large.limit == "compute" and large.micro_batch * 2048 > intensity
    assert large.utilisation > 2 * small.utilisation


def test_the_estimators_count_the_workloads_flops():
    config, tokens = CONFIG["590M"], 1.18e10
    t = training_time(config, tokens, Cluster(WSE2, 1), 264, 2048)
    flops = gpt_workload(config, context=2048, dtype="fp16").training_flops() * tokens
    assert t.flops == flops and t.steps == math.ceil(tokens / (264 * 2048))
    assert t.days == pytest.approx(t.steps * t.step_s / 86400)
    days = gpu_training_days(config, tokens, H100, 8, 0.4, 2048)
    assert days * 86400 * 8 * H100.peak_flops() * 0.4 == pytest.approx(flops, rel=1e-12)


def test_a_shape_streams_as_its_config_does():
    config = CONFIG["111M"]
    shape = Shape.from_config(config)
    a = weight_streaming(config, Cluster(WSE2, 1), 120, 2048)
    b = weight_streaming(shape, Cluster(WSE2, 1), 120, 2048)
    assert (a.step, a.micro_batch, a.sram_bytes) == (b.step, b.micro_batch, b.sram_bytes)
    # a LLaMA-like shape: no position table, so the embedding streams only the token rows it reads
    llama = Shape("small", n_layer=4, d_model=512, n_head=8, n_kv_head=2, d_ffn=1536, vocab=32000)
    s = weight_streaming(llama, Cluster(WSE2, 1), 8, 1024, micro_batch=1)
    assert s.stages == ["embed", "h0", "h1", "h2", "h3", "head"]
    assert s.forward[0] == 1024 * 512 * 2 / (WSE2.io_bits_per_s / 8)  # 1,024 rows of 512, 16-bit
    assert s.flops == gpt_workload(llama, 1024).training_flops() * 8 * 1024


def test_bad_input():
    with pytest.raises(ValueError, match="systems=0 must be a positive integer"):
        Cluster(WSE2, 0)
    huge = GPTConfig(n_layer=2, n_head=64, n_embd=40960, block_size=64, vocab_size=256)
    with pytest.raises(ValueError, match=r"layer h0 needs [\d,]+ bytes of weights, twice that .* over the "
                                         r"WSE-2's 36,642,816,000 bytes of SRAM on the 750 x 994 PEs "
                                         r"a program gets"):
        weight_streaming(huge, Cluster(WSE2, 1), 8, 64)
    with pytest.raises(ValueError, match="tokens=-1 must be a non-negative"):
        training_time(CONFIG["111M"], -1, Cluster(WSE2, 1), 120, 2048)
    with pytest.raises(ValueError, match="tokens=-1"):
        gpu_training_days(CONFIG["111M"], -1, H100, 8, 0.4, 2048)
    with pytest.raises(ValueError, match="batch=10 sequences do not split evenly over 4 systems"):
        weight_streaming(CONFIG["111M"], Cluster(WSE2, 4), 10, 2048)
    with pytest.raises(ValueError, match="micro_batch=7 must divide the 120 sequences per system"):
        weight_streaming(CONFIG["111M"], Cluster(WSE2, 1), 120, 2048, micro_batch=7)
    with pytest.raises(ValueError, match="mfu=1.5"):
        gpu_training_days(CONFIG["111M"], 1e9, H100, 8, 1.5, 2048)
