"""wafer.streaming: weight streaming's step, SwarmX, the training-time estimator, and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.model import GPT, LLAMA_STYLE, GPTConfig
from minigpt.scaling import CEREBRAS_GPT
from wafer.hardware import H100, WSE2, Cluster
from wafer.stages import pipeline_stages
from wafer.streaming import (
    CEREBRAS_GPT_RUNS,
    SWARMX_LEVEL_S,
    UPDATE_BYTES_PER_PARAM,
    UPDATE_BYTES_PER_S,
    Run,
    gpu_training_days,
    max_micro_batch,
    swarmx_levels,
    swarmx_seconds,
    timeline,
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
    # MemoryX, by hand: the gradients arrive in reverse order, each after its stream and one tree level
    # (2 systems); the updates run one after another; the tied head owns only its final LayerNorm
    update = [p * UPDATE_BYTES_PER_PARAM / UPDATE_BYTES_PER_S for p in (256 * 64 + 128 * 64, h0.params,
                                                                      h0.params, 2 * 64)]
    assert s.update.tolist() == pytest.approx(update, rel=1e-12)
    t, free, ends = 0.0, 0.0, {}
    for i in (3, 2, 1, 0):
        start = max(free, t + s.stream[i] + SWARMX_LEVEL_S)
        assert s.update_start[i] == pytest.approx(start, rel=1e-12)
        free = ends[i] = start + update[i]
        t += s.backward[i]
    assert s.wait_s == pytest.approx(max(0.0, max(ends[0], ends[1]) - t), rel=1e-12, abs=1e-18)
    assert s.boundary == s.wait_s + SWARMX_LEVEL_S and s.broadcast_s == SWARMX_LEVEL_S


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


def test_a_model_and_its_workload_stream_as_its_config_does():
    config = CONFIG["111M"]
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = GPT(config)
    a = weight_streaming(config, Cluster(WSE2, 1), 120, 2048)
    for other in (model, gpt_workload(config, 2048)):
        b = weight_streaming(other, Cluster(WSE2, 1), 120, 2048)
        assert (a.step, a.micro_batch, a.sram_bytes) == (b.step, b.micro_batch, b.sram_bytes)
    # a LLaMA-like config: no position table, so the embedding streams only the token rows it reads
    llama = GPTConfig(**LLAMA_STYLE, n_layer=4, n_embd=512, n_head=8, n_kv_head=2, mlp_hidden=1536,
                      vocab_size=32000, block_size=1024)
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


def test_cerebras_gpt_runs_match_the_published_batches_and_tokens():
    """Each run's phases give the paper's tokens (within 0.5%) and split the batch evenly; 13B ran 57,000
    steps at 720 on 8 systems, then 78,223 at 1,080 on 12: 90 sequences per system either way."""
    assert list(CEREBRAS_GPT_RUNS) == [m.name for m in CEREBRAS_GPT]
    for m in CEREBRAS_GPT:
        runs = CEREBRAS_GPT_RUNS[m.name]
        assert all(r.batch % r.systems == 0 for r in runs)
        assert abs(sum(r.tokens(2048) for r in runs) / m.tokens - 1) < 0.005, m.name
    first, second = CEREBRAS_GPT_RUNS["13B"]
    assert (first.batch // first.systems, second.batch // second.systems) == (90, 90)
    assert first.steps * first.batch == 38_000 * second.batch  # the step count reset to 38k at batch 1080
    assert sum(r.systems for r in CEREBRAS_GPT_RUNS["13B"]) <= 20 and max(
        r.systems for runs in CEREBRAS_GPT_RUNS.values() for r in runs) <= 16  # Andromeda: 16 systems
    with pytest.raises(ValueError, match="context=0"):
        Run(1, 8, 10).tokens(0)


def test_max_micro_batch_is_the_sram_cap_of_weight_streaming():
    for name in ("1.3B", "6.7B", "13B"):
        cap = max_micro_batch(CONFIG[name], Cluster(WSE2, 1), 2048)
        s = weight_streaming(CONFIG[name], Cluster(WSE2, 1), cap, 2048, micro_batch=cap)
        assert s.sram_bytes <= WSE2.sram_bytes(WSE2.pes)
        with pytest.raises(ValueError, match=f"micro_batch={cap + 1} needs"):
            weight_streaming(CONFIG[name], Cluster(WSE2, 1), cap + 1, 2048, micro_batch=cap + 1)
    huge = GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=2 ** 20, vocab_size=256)
    assert max_micro_batch(huge, Cluster(WSE2, 1), recompute=False) == 0  # one sequence does not fit


@pytest.mark.parametrize("systems, batch", [(1, 512), (64, 512), (4, 96)])
def test_the_timeline_is_the_steps_own_numbers(systems, batch):
    s = weight_streaming(CONFIG["1.3B"], Cluster(WSE2, systems), batch, 2048)
    bars = timeline(s)
    per_micro_batch = float(s.forward.sum() + s.backward.sum())
    boundary = [b for b in bars if b.lane == "boundary"]
    assert len(boundary) == 1 and boundary[0].start == pytest.approx(per_micro_batch, rel=1e-12)
    assert boundary[0].end - boundary[0].start == pytest.approx(s.boundary, rel=1e-12)
    assert s.micro_batches * per_micro_batch + s.boundary == pytest.approx(s.step, rel=1e-12)
    for lane in ("weights in", "compute", "gradients out", "update"):  # one thing at a time in each lane
        spans = sorted((b.start, b.end) for b in bars if b.lane == lane)
        assert all(a[1] <= b[0] * (1 + 1e-12) for a, b in zip(spans, spans[1:])), lane
    compute = [b for b in bars if b.lane == "compute"]
    assert sum(b.end - b.start for b in compute) == pytest.approx(float(s.compute.sum()), rel=1e-12)
    n = len(s.stages)
    assert [b.stage for b in compute] == s.stages + s.stages[::-1]  # forward in order, backward reversed
    assert len([b for b in bars if b.lane == "weights in"]) == 2 * n  # weights stream in twice
    # the tied head owns only its final LayerNorm: the matrix is updated with the embedding
    head = next(b for b in bars if b.lane == "update" and b.stage == "head")
    assert head.end - head.start == pytest.approx(2 * 2048 * UPDATE_BYTES_PER_PARAM / UPDATE_BYTES_PER_S)
