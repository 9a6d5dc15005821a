"""Sampling and the KV cache."""

import re

import pytest
import torch

from minigpt.generate import KVCache, filter_logits, generate, sample_next
from minigpt.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=50)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(10)  # a peaked distribution, so greedy choices are clear
    return m


def test_cached_logits_equal_uncached(model):
    x = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model, 3)
        first, _ = model(x[:, :25], kv_cache=cache)  # a prompt, then one token at a time
        steps = [first] + [model(x[:, t:t + 1], kv_cache=cache)[0] for t in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 40


def test_cached_generation_equals_uncached(model):
    prompt = torch.randint(0, 50, (2, 5))
    for kwargs in ({"do_sample": False}, {"temperature": 0.8, "top_k": 10}):
        a = generate(model, prompt, 100, generator=torch.Generator().manual_seed(1), **kwargs)
        b = generate(model, prompt, 100, generator=torch.Generator().manual_seed(1), use_cache=False,
                     **kwargs)
        assert torch.equal(a, b)  # 105 tokens: past block_size=64, where the window slides
        assert a.shape == (2, 105)


def test_long_prompts_keep_their_last_block_size_tokens(model):
    prompt = torch.randint(0, 50, (1, 100))
    out = generate(model, prompt, 10, do_sample=False)
    cropped = generate(model, prompt[:, -64:], 10, do_sample=False)
    assert torch.equal(out[:, :100], prompt) and torch.equal(out[:, 100:], cropped[:, 64:])


def test_sampling_knobs(model):
    prompt = [1, 2, 3]
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(generate(model, prompt, 20, top_k=1, generator=g(0)),
                       generate(model, prompt, 20, do_sample=False))
    greedy = generate(model, prompt, 20, do_sample=False)
    assert torch.equal(generate(model, prompt, 20, temperature=0), greedy)
    assert torch.equal(generate(model, prompt, 20, generator=g(5)),
                       generate(model, prompt, 20, generator=g(5)))
    many = generate(model, prompt, max_length=30, num_return_sequences=5, generator=g(0))
    assert many.shape == (5, 30) and len({tuple(r) for r in many.tolist()}) > 1


def test_stop_tokens_end_a_sequence(model):
    greedy = generate(model, [1, 2, 3], 30, do_sample=False)[0, 3:].tolist()
    stop = greedy[4]
    out = generate(model, [1, 2, 3], 30, do_sample=False, stop_tokens=[stop])[0, 3:].tolist()
    first = greedy.index(stop)
    assert out == greedy[:first + 1]  # everyone stopped, so generation ended there


def test_filter_logits_closed_form():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = lambda x: (x > float("-inf")).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False, False]  # 0.5 < 0.6
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_p=0.86)) == [True, True, True, True, False]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(model, [1], 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, [1], 5, top_p=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(model, [1], 5, top_p=1.5)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, [1], 5, top_k=0)
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match=r"\[0, 50\); got 0..50"):
        generate(model, [0, 50], 5)
    with pytest.raises(ValueError, match="max_new_tokens or max_length"):
        generate(model, [1])


@pytest.mark.parametrize("name, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", float("-inf")),
    ("top_p", float("nan")), ("top_p", float("inf")),
    ("top_k", float("nan")), ("top_k", float("inf")), ("top_k", 2.0), ("top_k", True),
])
def test_nan_and_infinite_sampling_settings_are_named(model, name, value):
    pattern = re.escape(f"{name}={value!r} must be")
    with pytest.raises(ValueError, match=pattern):
        generate(model, [1], 5, **{name: value})
    with pytest.raises(ValueError, match=pattern):
        sample_next(torch.zeros(2, 50), **{name: value})
    with pytest.raises(ValueError, match=pattern):  # greedy decoding does not excuse them
        generate(model, [1], 5, do_sample=False, **{name: value})


def test_sample_next_is_greedy_at_temperature_zero_and_draws_from_the_filtered_softmax():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.1, 0.2]]))
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_next(logits, top_k=2, generator=g) for _ in range(4000)])
    assert not (draws[:, 0] == 0).any() and not (draws[:, 1] == 1).any()  # top_k=2 drops the least likely
    share = (draws[:, 0] == 1).float().mean().item()  # 0.6 / (0.6 + 0.3) after renormalising
    assert abs(share - 2 / 3) < 0.03  # about 4 standard deviations (sd = 0.0075 for 4000 draws)
    expected = torch.multinomial(filter_logits(logits, 0.7, None, 0.8).softmax(-1), 1,
                                 generator=torch.Generator().manual_seed(5))[:, 0]
    assert torch.equal(sample_next(logits, 0.7, None, 0.8, torch.Generator().manual_seed(5)), expected)


def plain_decode(model, prompt, n, pick):
    """The reference decoding loop: the whole window through the model every step, no cache, the
    weights as stored; ``pick`` chooses from the last position's logits."""
    idx = torch.as_tensor(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, pick(logits[:, -1])[:, None]], dim=1)
    return idx


@pytest.mark.parametrize("length", [1, 2, 30, 63, 64, 100])
def test_generate_equals_the_plain_loop(model, length):
    # every prompt length around block_size=64, and 80 new tokens, so the window slides in each case
    prompt = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(length))
    greedy = plain_decode(model, prompt, 80, lambda logits: logits.argmax(-1))
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompt, 80, do_sample=False, use_cache=use_cache), greedy)
    g = torch.Generator().manual_seed(7)
    sampled = plain_decode(model, prompt, 80, lambda logits: sample_next(logits, 0.9, 20, 0.95, g))
    ours = generate(model, prompt, 80, temperature=0.9, top_k=20, top_p=0.95,
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, sampled)


def test_stopped_rows_are_padded_while_the_others_go_on(model):
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = [generate(model, p, 30, do_sample=False)[0, 3:].tolist() for p in prompts]
    stop = free[0][2]  # the first row stops at its third new token
    assert stop not in free[1][:10]  # (the second row goes on past it, for this seed)
    out = generate(model, prompts, 30, do_sample=False, stop_tokens=[stop], pad_token_id=0).tolist()
    ends = [row.index(stop) + 1 if stop in row else len(row) for row in free]
    assert len(out[0]) == 3 + max(ends)  # generation ended when the last row stopped
    for row, mine, end in zip(out, free, ends):
        assert row[3:3 + end] == mine[:end] and all(t == 0 for t in row[3 + end:])


def test_column_major_weights_hold_the_same_numbers_and_are_restored(model):
    from minigpt.generate import _column_major

    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = [(m.weight, m.weight.data_ptr(), m.weight.stride(), m.weight.clone()) for m in linear]
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        reference, _ = model(x)
        with _column_major(model):
            assert model.lm_head.weight is model.transformer.wte.weight  # still tied
            for m, (_, _, _, values) in zip(linear, before):
                assert m.weight.t().is_contiguous() and torch.equal(m.weight, values)
            logits, _ = model(x)
    # float32 sums of 32 products taken in another order: the logits agree to rounding, about 1e-7
    # of their size; 1e-5 of the largest logit leaves room without hiding a wrong product
    scale = reference.abs().max().item()
    torch.testing.assert_close(logits, reference, atol=1e-5 * scale, rtol=1e-5)
    for m, (w, ptr, stride, values) in zip(linear, before):
        assert m.weight is w and w.data_ptr() == ptr and w.stride() == stride and torch.equal(w, values)


def test_the_layout_is_restored_when_generation_fails(model):
    model.train()
    strides = [p.stride() for p in model.parameters()]
    with pytest.raises(TypeError):
        generate(model, [1, 2], 5, generator="not a generator")  # fails inside the decoding loop
    assert [p.stride() for p in model.parameters()] == strides and model.training
    model.eval()
