"""Context parallelism: ring attention in real processes on gloo, checked equal to one process."""

import parallel_context as pc
import pytest
import torch
import torch.nn.functional as F

from minigpt.attention import scaled_dot_product_attention
from minigpt.parallel.context import (
    SPLITS,
    causal_work,
    chunks_of,
    gather_sequence,
    online_attention,
    ring_attention,
    ring_attention_worker,
    ring_bytes_per_rank,
    ring_schedule,
    split_sequence,
)
from minigpt.parallel.launch import spawn


def qkv(b=2, h=3, t=24, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 6, 24])
@pytest.mark.parametrize("causal", [True, False])
def test_online_attention_equals_softmax_attention(n_blocks, causal):
    q, k, v, _ = qkv()
    q = q * 4  # large scores: the running maximum must rescale the sums, or exp overflows
    ref, _ = scaled_dot_product_attention(q, k, v, is_causal=causal)
    # float64 and the same products: only the order of the sums differs, so about 1e-15
    assert torch.allclose(online_attention(q, k, v, n_blocks, causal), ref, rtol=0, atol=1e-12)


def test_split_and_gather_are_inverse():
    x = torch.arange(16.0).view(1, 16, 1)
    for world in (1, 2, 4):
        for split in SPLITS:
            parts = split_sequence(x, world, split, dim=1)
            assert torch.equal(gather_sequence(parts, split, dim=1), x)
    # zig-zag over 2 ranks: 4 chunks of 4 positions, rank 0 holds chunks 0 and 3
    assert split_sequence(x, 2, "zigzag", dim=1)[0].flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunks_of(1, 4, "zigzag") == [1, 6]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_schedule_covers_the_causal_triangle_once(world):
    for split in SPLITS:
        n = world * len(chunks_of(0, world, split))
        pairs = [(p.q_chunk, p.k_chunk) for p in ring_schedule(world, split)]
        assert sorted(pairs) == [(i, j) for i in range(n) for j in range(i + 1)]
        for p in ring_schedule(world, split):
            # the key chunk a rank sees at step s is the one rank (r - s) mod N holds
            assert p.k_chunk in chunks_of((p.rank - p.step) % world, world, split)
            assert p.diagonal == (p.q_chunk == p.k_chunk) and p.q_chunk in chunks_of(p.rank, world, split)
    assert causal_work(world, "contiguous") == [r + 1 for r in range(world)]
    assert causal_work(world, "zigzag") == [2 * world + 1] * world


def test_bytes_formula():
    assert ring_bytes_per_rank((2, 3, 6, 8), 4, 8) == {"forward": 2 * 3 * 2304, "backward": 2 * 7 * 2304}
    assert ring_bytes_per_rank((2, 3, 6, 8), 1, 8) == {"forward": 0, "backward": 0}


def test_bad_input_is_refused():
    x = torch.zeros(1, 10, 4)
    with pytest.raises(ValueError, match="n_blocks=3"):
        online_attention(x, x, x, 3)
    with pytest.raises(ValueError, match="split='striped'"):
        chunks_of(0, 2, "striped")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank=2"):
        chunks_of(2, 2, "zigzag")
    with pytest.raises(ValueError, match="length 10 must be divisible by 4"):
        split_sequence(x, 2, "zigzag")
    with pytest.raises(ValueError, match="process group"):
        ring_attention(x, x, x)
    with pytest.raises(ValueError, match="repeats=0"):
        ring_attention_worker(0, 1, x, x, x, x, repeats=0)


def test_ring_attention_equals_one_process():
    world = 3  # odd, and N - 1 = 2 steps of the ring
    b, h, t, d = 2, 3, 8 * world, 8
    q, k, v, dout = qkv(b, h, t, d)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, is_causal=True)
    (ref * dout).sum().backward()
    results = spawn(pc.both_splits, world, q, k, v, dout)
    for split in SPLITS:
        mine = [r[split] for r in results]
        # float64, the same products summed in another order (blocks, online rescaling): ~1e-15
        assert torch.allclose(gather_sequence([r["out"] for r in mine], split), ref, rtol=0, atol=1e-12)
        for name, leaf in zip(("dq", "dk", "dv"), leaves):
            got = gather_sequence([r[name] for r in mine], split)
            assert torch.allclose(got, leaf.grad, rtol=0, atol=1e-12), (split, name)
        stats = [r["stats"] for r in mine]
        expected = ring_bytes_per_rank((b, h, t // world, d), world, 8)
        assert [s["bytes_forward"] for s in stats] == [expected["forward"]] * world
        assert [s["bytes_backward"] for s in stats] == [expected["backward"]] * world
        assert [s["pairs_forward"] for s in stats] == causal_work(world, split)
        # every (query, key) entry a causal query may see is computed once, on some rank
        assert sum(s["scores_forward"] for s in stats) == t * (t + 1) // 2
    assert all("divisible by 2 (zigzag)" in r["error"] for r in results)
    # a small GPT (float64) with its 12 positions split over the 3 ranks: loss and every gradient
    model = pc.small_gpt()
    x, targets = pc.gpt_batch()
    logits, float32_loss = model(x, targets)
    # GPT.forward takes its cross-entropy in float32; in float64 the same loss, to compare exactly
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.allclose(loss.float(), float32_loss)
    loss.backward()
    for split in SPLITS:
        for r in results:
            got = r["gpt"][split]
            # float64; the loss is summed over ranks, attention over blocks: ~1e-16 relative
            assert torch.allclose(got["loss"], loss.detach(), rtol=1e-12, atol=0), split
            assert got["grads"].keys() == dict(model.named_parameters()).keys()
            for name, p in model.named_parameters():
                assert torch.allclose(got["grads"][name], p.grad, rtol=0, atol=1e-12), (split, name)
    zigzag = [r["zigzag"]["stats"]["scores_forward"] for r in results]
    assert len(set(zigzag)) == 1  # the zig-zag split gives every rank the same useful work
