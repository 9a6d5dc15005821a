"""The mixture-of-experts MLP against a loop over tokens, the dense MLP it generalises, the balancing
loss's formula, the parameter count, and a small MoE GPT that learns."""

import math

import pytest
import torch

from minigpt.model import GPT, MLP, GPTConfig
from minigpt.moe import MoE, dispatch_order, load_balancing_loss, route


def small(**kw):
    base = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_expert=4, expert_top_k=2)
    return GPTConfig(**(base | kw))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_equals_a_loop_over_tokens(top_k):
    torch.manual_seed(0)
    moe = MoE(small(n_expert=5, expert_top_k=top_k)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    y = moe(x)
    flat = x.reshape(-1, 16)
    expected = torch.zeros_like(flat)
    for n, token in enumerate(flat):
        p = torch.softmax(moe.router.weight @ token, dim=0)
        chosen = sorted(range(5), key=lambda e: -p[e].item())[:top_k]
        total = sum(p[e] for e in chosen)
        for e in chosen:
            expected[n] += p[e] / total * moe.experts[e](token)
    # float64: the same products, summed in another order
    torch.testing.assert_close(y.reshape(-1, 16), expected, rtol=1e-12, atol=1e-12)


def test_one_expert_top_1_is_the_dense_mlp():
    torch.manual_seed(0)
    config = small(n_expert=1, expert_top_k=1)
    moe, mlp = MoE(config), MLP(config)
    mlp.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 5, 16)
    # one expert with weight exactly 1 (p / p): the same operations as the MLP, bit for bit
    assert torch.equal(moe(x), mlp(x))


def test_dispatch_groups_pairs_by_expert_and_counts_them():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, counts = dispatch_order(experts, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert experts.flatten()[order].tolist() == [0, 0, 1, 1, 2, 2]
    assert (order // 2).tolist() == [0, 1, 1, 2, 0, 2]  # the tokens, by expert then by token


def test_balancing_loss_is_its_formula_and_one_when_uniform():
    torch.manual_seed(0)
    moe = MoE(small(n_expert=4, expert_top_k=2)).double()
    x = torch.randn(50, 16, dtype=torch.float64)
    moe(x)
    r = route(moe.router, x, 2)
    f = torch.stack([(r.experts == e).sum() for e in range(4)]).double() / (50 * 2)
    p = r.probs.mean(0)
    torch.testing.assert_close(moe.aux_loss, 4 * (f * p).sum(), rtol=1e-12, atol=0)
    # a router of zeros: every probability is 1/E, so the loss is sum_i f_i = 1 whatever the top-k
    # picked among the tied scores
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-12)
    # uniform routing, f = P = 1/E: E x E x 1/E^2 = 1
    uniform = load_balancing_loss(torch.full((4,), 25), torch.full((4,), 50 / 4, dtype=torch.float64), 50, 2)
    assert uniform.item() == pytest.approx(1.0, abs=1e-15)
    # every token on experts 0 and 1, which hold all the probability: f = P = (1/2, 1/2, 0, 0), the
    # largest value top-2 routing allows, E x 2 x (1/2)^2 = E / k = 2
    worst = load_balancing_loss(torch.tensor([50, 50, 0, 0]), torch.tensor([25.0, 25.0, 0, 0]), 50, 2)
    assert worst.item() == pytest.approx(2.0)
    assert moe.aux_loss.requires_grad


def test_gpt_parameter_count():
    c = small(n_expert=6)
    dense = GPT(small(n_expert=0)).num_parameters()
    mlp = 8 * c.n_embd ** 2 + 5 * c.n_embd  # c_fc: C x 4C + 4C, c_proj: 4C x C + C
    router = c.n_embd * c.n_expert
    assert GPT(c).num_parameters() == dense + c.n_layer * ((c.n_expert - 1) * mlp + router)


def test_dense_default_is_unchanged_and_moe_loss_adds_the_weighted_aux():
    assert GPTConfig().n_expert == 0
    assert isinstance(GPT(small(n_expert=0, n_layer=1)).transformer.h[0].mlp, MLP)
    torch.manual_seed(0)
    model = GPT(small(moe_aux_weight=0.5)).eval()
    x = torch.randint(0, 40, (2, 16))
    logits, loss = model(x, x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    aux = torch.stack([b.mlp.aux_loss for b in model.transformer.h]).mean()
    torch.testing.assert_close(loss, ce + 0.5 * aux)
    assert model.moe_aux_loss().item() == pytest.approx(aux.item())
    with pytest.raises(ValueError, match="n_expert=0"):
        GPT(small(n_expert=0)).moe_aux_loss()
    with pytest.raises(ValueError, match="n_expert=4: a mixture of experts has no Hugging Face equivalent"):
        model.to_hf()


def test_a_small_moe_gpt_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(small(n_expert=4, expert_top_k=2))
    x = torch.randint(0, 40, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(40) - 0.3  # starts near chance
    assert losses[-1] < 0.5 * losses[0]  # and learns the batch
    assert all(p.grad is not None for p in model.parameters())  # every expert and router trained


@pytest.mark.parametrize("kw, message", [
    (dict(n_expert=-1), "n_expert=-1"),
    (dict(n_expert=2.0), "n_expert=2.0"),
    (dict(n_expert=2, expert_top_k=3), "expert_top_k=3 must be at most n_expert=2"),
    (dict(n_expert=2, expert_top_k=0), "expert_top_k=0"),
    (dict(n_expert=2, moe_aux_weight=-0.1), "moe_aux_weight=-0.1"),
    (dict(n_expert=2, moe_aux_weight=float("nan")), "moe_aux_weight=nan"),
])
def test_bad_moe_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        small(**kw)
