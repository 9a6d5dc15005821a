"""The GPT against Hugging Face's GPT-2: same logits, same greedy tokens; parameters and FLOPs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minigpt.attention import MultiHeadAttention
from minigpt.checks import positive_int
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig, flops_per_token

transformers = pytest.importorskip("transformers")

CONFIGS = [  # (n_layer, n_head, n_embd, block_size, vocab_size)
    (1, 1, 8, 16, 50),
    (2, 4, 64, 128, 300),
    (3, 3, 48, 64, 1000),
    (12, 12, 768, 1024, 50257),  # GPT-2 small's shapes
]


def random_hf(n_layer, n_head, n_embd, block, vocab, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block,
                                     vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("shape", CONFIGS, ids=lambda s: "x".join(map(str, s)))
def test_logits_equal_hugging_face_both_ways(shape):
    hf = random_hf(*shape)
    ours = GPT.from_hf(hf).eval()
    x = torch.randint(0, shape[4], (2, min(shape[3], 40)))
    with torch.no_grad():
        reference = hf(x).logits
        logits, _ = ours(x)
        back = ours.to_hf()(x).logits
    # float32: same operations in a different order; 1e-5 absolute on logits of size ~1
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back, reference, atol=1e-5, rtol=1e-5)


def test_trained_looking_weights_also_match():
    """Random init gives small logits; scale weights up so that differences would show."""
    hf = random_hf(2, 4, 64, 64, 300, seed=1)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(5)
    ours = GPT.from_hf(hf).eval()
    x = torch.randint(0, 300, (3, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-4, rtol=1e-5)


def test_greedy_generation_equals_hugging_face():
    hf = random_hf(3, 4, 64, 128, 300, seed=2)
    with torch.no_grad():  # let positions steer the output, so that greedy does not repeat one token
        hf.transformer.wpe.weight.mul_(30)
    ours = GPT.from_hf(hf)
    prompt = torch.randint(0, 300, (1, 12))
    theirs = hf.generate(prompt, max_new_tokens=50, do_sample=False, pad_token_id=299)
    assert torch.equal(generate(ours, prompt, 50, do_sample=False), theirs)
    assert len(set(theirs[0, 12:].tolist())) > 5  # a real continuation, not one token repeated


def test_parameter_count_of_gpt2_small():
    config = GPTConfig()
    model = GPT(config)
    C, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    formula = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    hf_count = sum(p.numel() for p in random_hf(12, 12, 768, 1024, 50257).parameters())
    assert model.num_parameters() == formula == hf_count == 124_439_808
    assert model.num_parameters(non_embedding=True) == formula - V * C - T * C
    assert model.lm_head.weight is model.transformer.wte.weight


def test_initialisation_scales_residual_projections():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=100))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.0005
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.0005


@pytest.mark.parametrize("shape, t", [((2, 4, 64, 128, 500), 128), ((2, 4, 64, 128, 500), 32),
                                      ((4, 8, 256, 256, 1000), 256), ((3, 2, 96, 64, 50257), 64)])
def test_flop_formula_equals_torch_flop_counter(shape, t):
    n_layer, n_head, n_embd, block, vocab = shape
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, vocab_size=vocab)
    check_flops_against_counter(config, t)


@pytest.mark.parametrize("experts, top_k", [(4, 1), (4, 2), (8, 3)])
def test_flop_formula_counts_a_mixture_of_experts(experts, top_k):
    # dropless routing runs exactly top_k expert MLPs per token, whatever the router picks
    check_flops_against_counter(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=100,
                                          n_expert=experts, expert_top_k=top_k), 64)


def check_flops_against_counter(config: GPTConfig, t: int) -> None:
    vocab = config.vocab_size
    model = GPT(config).eval()
    for m in model.modules():  # FlopCounterMode does not see the CPU SDPA kernel; count the matmuls
        if isinstance(m, MultiHeadAttention):
            m.use_sdpa = False
    x = torch.randint(0, vocab, (2, t))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    measured = counter.get_total_flops() / x.numel()
    assert abs(flops_per_token(config, t)["forward"] / measured - 1) < 0.02
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    assert abs(flops_per_token(config, t)["training"] / (counter.get_total_flops() / x.numel()) - 1) < 0.02


def test_config_validation():
    with pytest.raises(ValueError, match="n_embd=100 must be divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_layer=0"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        GPTConfig(dropout=1.5)
    with pytest.raises(ValueError, match="block_size=2.5"):
        GPTConfig(block_size=2.5)


def test_forward_rejects_bad_input():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        model(torch.tensor([[1, 25]]))
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(9, dtype=torch.long))


def test_loss_ignores_minus_100():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    x = torch.randint(0, 20, (2, 8))
    y = x.clone()
    y[:, :4] = -100
    logits, loss = model(x, y)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 20), y[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_from_pretrained_loads_a_save_pretrained_directory(tmp_path):
    hf = random_hf(2, 4, 64, 64, 300, seed=3)
    hf.save_pretrained(tmp_path)
    x = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        reference = hf(x).logits
        for where in (tmp_path, str(tmp_path)):  # a Path or its string
            ours = GPT.from_pretrained(where).eval()
            torch.testing.assert_close(ours(x)[0], reference, atol=1e-5, rtol=1e-5)
    assert ours.config.n_layer == 2 and ours.config.vocab_size == 300


def test_from_pretrained_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory .*save_pretrained"):
        GPT.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model .*config.json"):
        GPT.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="holds no model"):
        GPT.from_pretrained(str(tmp_path / "empty"))
    # a model name that no cache holds: the error says how to fetch it offline, and nothing is downloaded
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*from_pretrained"):
        GPT.from_pretrained("minigpt-tests/no-such-model")


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_one_positive_integer_check_for_every_shape_field(value):
    with pytest.raises(ValueError, match=f"^n_layer={value!r} must be a positive integer$"):
        positive_int("n_layer", value)
    with pytest.raises(ValueError, match=f"^n_layer={value!r} must be a positive integer$"):
        GPTConfig(n_layer=value)
    assert positive_int("n_layer", 7) == 7
