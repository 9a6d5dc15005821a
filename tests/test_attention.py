"""Attention against torch's own: F.scaled_dot_product_attention and nn.MultiheadAttention."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minigpt.attention import (
    LearnedPositions,
    MultiHeadAttention,
    RotaryEmbedding,
    causal_mask,
    record_attention,
    scaled_dot_product_attention,
    sinusoidal_positions,
)

# float64 agrees to rounding; float32 to the error of summing d products in a different order
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
MASKS = ["none", "causal", "bool", "additive", "padding"]


def make_masks(kind, b, t, s, g, dtype):
    """(our kwargs, the equivalent SDPA attn_mask/is_causal kwargs)."""
    if kind == "none":
        return {}, {}
    if kind == "causal":
        return {"is_causal": True}, {"is_causal": True}
    if kind == "bool":
        m = torch.rand(b, 1, t, s, generator=g) > 0.4
        m[..., 0] = True  # every query may attend somewhere
        return {"attn_mask": m}, {"attn_mask": m}
    if kind == "additive":
        m = torch.randn(t, s, generator=g, dtype=dtype)
        return {"attn_mask": m}, {"attn_mask": m}
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    pad = torch.arange(s)[None, :] >= lengths[:, None]  # True = padding, at the right
    return {"key_padding_mask": pad}, {"attn_mask": ~pad[:, None, None, :]}


@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 9), s=st.integers(1, 9),
       d=st.sampled_from([1, 3, 5, 8]), kind=st.sampled_from(MASKS),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31))
def test_explicit_attention_equals_sdpa(b, h, t, s, d, kind, dtype, seed):
    if kind == "causal":
        s = t  # square: SDPA's is_causal aligns the top-left corner, ours the last query (same if T == S)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (t, s, s))
    for x in (q, k, v):
        x.requires_grad_(True)
    ours_kw, ref_kw = make_masks(kind, b, t, s, g, dtype)
    ours, weights = scaled_dot_product_attention(q, k, v, **ours_kw)
    ref = F.scaled_dot_product_attention(q, k, v, **ref_kw)
    torch.testing.assert_close(ours, ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.allclose(weights.sum(-1), torch.ones((), dtype=dtype), atol=TOL[dtype])
    # and the gradients, through the mask and softmax
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=10 * TOL[dtype], rtol=10 * TOL[dtype])


def test_query_with_no_allowed_key_gets_zeros_like_sdpa():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    ours, w = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert (ours[0, 0, 1] == 0).all() and (w[0, 0, 1] == 0).all()


def copy_to_torch_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(ours.n_embd, ours.n_head, batch_first=True,
                                dtype=ours.c_attn.weight.dtype)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.c_attn.weight)  # q, k, v stacked along the output, as c_attn
        ref.in_proj_bias.copy_(ours.c_attn.bias)
        ref.out_proj.weight.copy_(ours.c_proj.weight)
        ref.out_proj.bias.copy_(ours.c_proj.bias)
    return ref.eval()


@given(b=st.integers(1, 3), t=st.integers(1, 12), h=st.sampled_from([1, 2, 3, 5]),
       hd=st.sampled_from([1, 3, 4, 7]), causal=st.booleans(), padded=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31))
def test_multi_head_equals_torch_multihead_attention(b, t, h, hd, causal, padded, dtype, seed):
    torch.manual_seed(seed)
    ours = MultiHeadAttention(h * hd, h, causal=causal, use_sdpa=False).to(dtype).eval()
    fast = MultiHeadAttention(h * hd, h, causal=causal, use_sdpa=True).to(dtype).eval()
    fast.load_state_dict(ours.state_dict())
    ref = copy_to_torch_mha(ours)
    x = torch.randn(b, t, h * hd, dtype=dtype)
    pad = None
    if padded:  # right padding that leaves the first key of every row
        lengths = torch.randint(1, t + 1, (b,))
        pad = torch.arange(t)[None, :] >= lengths[:, None]
    ref_mask = ~causal_mask(t) if causal else None  # nn.MultiheadAttention: True = may NOT attend
    with torch.no_grad():
        y = ours(x, key_padding_mask=pad)
        y_fast = fast(x, key_padding_mask=pad)
        y_ref, _ = ref(x, x, x, attn_mask=ref_mask, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(y, y_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(y_fast, y, atol=TOL[dtype], rtol=TOL[dtype])


def test_split_and_merge_heads_are_inverse():
    m = MultiHeadAttention(12, 3)
    x = torch.randn(2, 5, 12)
    heads = m.split_heads(x)
    assert heads.shape == (2, 3, 5, 4)
    torch.testing.assert_close(heads[:, 1], x[..., 4:8])  # head 1 sees channels 4..7
    assert torch.equal(m.merge_heads(heads), x)


def split_then_attend(m: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The forward pass written out with split_heads on each third of c_attn's output."""
    q, k, v = (m.split_heads(z) for z in m.c_attn(x).split(m.n_embd, dim=2))
    p = m.dropout if m.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=m.causal, scale=m.scale)
    return m.resid_dropout(m.c_proj(m.merge_heads(y)))


@pytest.mark.parametrize("training", [False, True])
def test_forward_and_gradients_equal_the_written_out_split_bit_for_bit(training):
    # forward takes q, k, v as one view of c_attn's output; the same numbers with the same strides as
    # splitting it, so the results (and the dropout masks drawn from the same seed) are identical
    torch.manual_seed(0)
    m = MultiHeadAttention(24, 3, dropout=0.1).train(training)
    x = torch.randn(2, 7, 24, requires_grad=True)
    results = []
    for fn in (m, lambda z: split_then_attend(m, z)):
        torch.manual_seed(1)
        y = fn(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    assert torch.equal(y, y_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


def test_cached_steps_equal_the_full_pass():
    torch.manual_seed(0)
    m = MultiHeadAttention(24, 3).eval()
    x = torch.randn(2, 9, 24)
    k_buf, v_buf = torch.zeros(2, 3, 12, 8), torch.zeros(2, 3, 12, 8)
    with torch.no_grad():
        full = m(x)
        steps = [m(x[:, :5], cache=(k_buf, v_buf, 0))]  # a prompt, then one position at a time
        steps += [m(x[:, t:t + 1], cache=(k_buf, v_buf, t)) for t in range(5, 9)]
        k_ref = m.split_heads(m.c_attn(x).split(24, dim=2)[1])  # what the key buffer should hold
    # float32: products over fewer rows, and one query against S keys, sum in another order than the
    # full T x T pass; 1e-5 relative is float32 rounding over sums of 24 terms, with room to spare
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k_buf[:, :, :9], k_ref, atol=1e-6, rtol=1e-5)
    assert (k_buf[:, :, 9:] == 0).all()  # nothing written past the positions seen
    with pytest.raises(ValueError, match="the cache holds 12 positions; 13 are needed"):
        m(x[:, :2], cache=(k_buf, v_buf, 11))


def test_record_attention():
    torch.manual_seed(0)
    model = nn.Sequential(MultiHeadAttention(8, 2), MultiHeadAttention(8, 2))
    with record_attention(model) as maps:
        model(torch.randn(1, 6, 8))
    assert len(maps) == 2 and all(len(m) == 1 for m in maps)
    w = maps[0][0]
    assert w.shape == (1, 2, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 6))
    assert (w.triu(diagonal=1) == 0).all()  # causal: nothing above the diagonal
    assert all(m.recorded is None for m in model)
    with pytest.raises(ValueError, match="Linear contains no MultiHeadAttention"):
        with record_attention(nn.Linear(2, 2)):
            pass


def test_dropout_on_the_weights():
    q, k, v = (torch.randn(2, 4, 64, 8) for _ in range(3))
    g = torch.Generator().manual_seed(0)
    _, w0 = scaled_dot_product_attention(q, k, v)
    _, w = scaled_dot_product_attention(q, k, v, dropout_p=0.25, generator=g)
    dropped = (w == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.02
    kept = w != 0
    torch.testing.assert_close(w[kept], w0[kept] / 0.75)
    m = MultiHeadAttention(16, 2, dropout=0.5).eval()
    x = torch.randn(1, 5, 16)
    assert torch.equal(m(x), m(x))  # no dropout at evaluation


def test_rope_scores_depend_only_on_the_offset():
    rope = RotaryEmbedding(8).double()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    t = 40
    qs = rope(q.expand(t, 8).clone())  # the same query vector at positions 0..t-1
    ks = rope(k.expand(t, 8).clone())
    scores = qs @ ks.T  # scores[m, n] = <R(m) q, R(n) k>
    for delta in range(-5, 6):
        diag = torch.diagonal(scores, offset=-delta)  # all pairs with m - n == delta
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-10, rtol=0)
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(t))  # a rotation keeps lengths
    torch.testing.assert_close(rope(q[None], offset=7)[0], qs[7])  # an offset is a later position


def test_sinusoidal_positions_closed_form():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * 8))
    p, i = 17, 3
    torch.testing.assert_close(pe[p, 2 * i].double(), torch.tensor(math.sin(p / 10000 ** (2 * i / 16)),
                                                                    dtype=torch.float64))
    torch.testing.assert_close(pe[p, 2 * i + 1].double(), torch.tensor(math.cos(p / 10000 ** (2 * i / 16)),
                                                                        dtype=torch.float64))


def test_learned_positions():
    pos = LearnedPositions(8, 4)
    assert pos(5).shape == (5, 4)
    assert torch.equal(pos(2, offset=3), pos.wpe.weight[3:5])
    with pytest.raises(ValueError, match="block_size=8"):
        pos(9)


def test_bad_input_names_the_shapes():
    q, k = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"k \(2, 5, 8\) and v \(2, 4, 8\)"):
        scaled_dot_product_attention(q, k, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"q \(2, 4, 8\) and k \(2, 5, 6\)"):
        scaled_dot_product_attention(q, torch.randn(2, 5, 6), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 3\).*\(2, 4, 5\)"):
        scaled_dot_product_attention(q, k, torch.randn(2, 5, 8), attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(2, 4\)"):
        scaled_dot_product_attention(q, k, torch.randn(2, 5, 8),
                                     key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_embd=100 must be a positive multiple of n_head=3"):
        MultiHeadAttention(100, 3)
    with pytest.raises(ValueError, match=r"x of shape \(2, 5, 7\)"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="dropout_p=1.0"):
        scaled_dot_product_attention(q, k, torch.randn(2, 5, 8), dropout_p=1.0)
    with pytest.raises(ValueError, match="head_dim=5 must be even"):
        RotaryEmbedding(5)
