"""From GPT-2 to LLaMA: minigpt's RMSNorm, SwiGLU, RoPE and grouped-query options against
transformers' LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (same logits both ways, same
greedy tokens), the KV cache under grouped-query attention, checkpoints read from save_pretrained
directories, and prompts of different lengths generated in one batch."""

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minigpt.attention import MultiHeadAttention, RotaryEmbedding
from minigpt.generate import KVCache, generate
from minigpt.model import GPT, GPT2_STYLE, LLAMA_STYLE, GPTConfig, flops_per_token, require_gpt2

transformers = pytest.importorskip("transformers")

VOCAB = 97
# family -> the options beyond LLAMA_STYLE that make minigpt's model that family's
FAMILIES = {
    "llama": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
}
HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def llama(family="llama", n_kv_head=2, seed=0, **kw):
    torch.manual_seed(seed)
    options = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=48, n_kv_head=n_kv_head,
                   rope_theta=5000.0, **LLAMA_STYLE)
    options.update(FAMILIES[family])
    options.update(kw)
    model = GPT(GPTConfig(**options)).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: move them, so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "norm.weight", ".bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def prompts(seed=1, batch=2, t=20):
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


# float32 throughout: the same operations in another order, and RoPE's angles in float64 here against
# float32 in transformers, differ by about 1e-7 of the logits' size; 1e-5 absolute on logits of size ~1
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])  # query heads per kv head
def test_logits_equal_transformers_both_ways(family, n_kv_head):
    ours = llama(family, n_kv_head)
    hf = ours.to_hf()
    assert type(hf).__name__ == HF_CLASS[family]
    assert sum(p.numel() for p in hf.parameters()) == ours.num_parameters()
    x = prompts()
    with torch.no_grad():
        reference = hf(x).logits
        torch.testing.assert_close(ours(x)[0], reference, **TOL)
        back = GPT.from_hf(hf).eval()  # and from transformers to minigpt
        # the same shape; transformers states the MLP's width, so it comes back set
        assert replace(back.config, mlp_hidden=None) == ours.config and back.config.mlp_hidden == 192
        torch.testing.assert_close(back(x)[0], reference, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings_and_biases_round_trip(family):
    kw = {"tie_embeddings": True}
    if family == "llama":
        kw["bias"] = True  # LLaMA's attention_bias and mlp_bias
    ours = llama(family, 2, **kw)
    hf = ours.to_hf()
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    x = prompts()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, **TOL)
        torch.testing.assert_close(GPT.from_hf(hf)(x)[0], hf(x).logits, **TOL)


def test_an_explicit_head_size_as_qwen3_uses():
    ours = llama("qwen3", 2, head_size=24)  # 4 heads of 24 in a 64-wide model
    assert ours.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 24, 64)
    hf = ours.to_hf()
    assert hf.config.head_dim == 24
    x = prompts()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_greedy_tokens_equal_transformers(family, n_kv_head):
    ours = llama(family, n_kv_head)
    hf = ours.to_hf()
    x = prompts(batch=3, t=6)
    theirs = hf.generate(x, max_new_tokens=20, do_sample=False, pad_token_id=0)
    for cache in (True, False):
        assert torch.equal(generate(ours, x, 20, do_sample=False, use_cache=cache), theirs)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_cache_under_grouped_query_attention_equals_no_cache(n_kv_head):
    model = llama("llama", n_kv_head)
    x = prompts(t=24)
    cache = KVCache(model, batch_size=2)
    # K = n_kv_head heads are kept, not n_head: that is the memory grouped-query attention saves
    assert cache.k.shape == (2, 2, n_kv_head, 48, 16)
    with torch.no_grad():
        whole = model(x)[0]
        parts = [model(x[:, :10], kv_cache=cache)[0]] + [model(x[:, i:i + 1], kv_cache=cache)[0]
                                                          for i in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, **TOL)


def test_gpt2_is_still_the_default():
    config = GPTConfig()
    assert config.is_gpt2 and config.kv_heads == 12 and config.ffn_hidden == 4 * 768
    assert all(getattr(config, k) == v for k, v in GPT2_STYLE.items())
    with torch.device("meta"):  # GPT-2 small's parameter count, on the meta device (no memory)
        meta = GPT(config)
    assert meta.num_parameters() == 124_439_808


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_equal_transformers_at_real_sizes(family):
    """LLaMA-2-7B's and Qwen's shapes, built on the meta device on both sides: no memory, no weights."""
    shapes = {"llama": dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=32, mlp_hidden=11008,
                            vocab_size=32000, block_size=4096),
              "qwen2": dict(n_layer=24, n_embd=896, n_head=14, n_kv_head=2, mlp_hidden=4864,
                            vocab_size=151936, block_size=32768, tie_embeddings=True),
              "qwen3": dict(n_layer=28, n_embd=1024, n_head=16, n_kv_head=8, head_size=128, mlp_hidden=3072,
                            vocab_size=151936, block_size=40960, tie_embeddings=True)}
    config = GPTConfig(**{**LLAMA_STYLE, **FAMILIES[family], **shapes[family]})
    with torch.device("meta"):
        ours = GPT(config)
        theirs = ours.to_hf()
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    if family == "llama":
        assert ours.num_parameters() == 6_738_415_616  # LLaMA-2-7B as published


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_reads_a_save_pretrained_directory(family, tmp_path):
    hf = llama(family, 2).to_hf()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = GPT.from_pretrained(tmp_path).eval()
    x = prompts()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, **TOL)


# LLaMA-3.1's published rescaling (factor 8, low and high frequency factors 1 and 4, pretrained on 8,192
# positions), with the context shrunk to 16 positions so that a 48-position test model uses all three
# regimes: pairs slowed, blended and kept
LLAMA3 = (8.0, 1.0, 4.0, 16)


def llama3_parameters(scaling=LLAMA3, theta=5000.0):
    factor, low, high, context = scaling
    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": context}


@pytest.mark.parametrize("head_dim,theta,scaling", [(64, 5000.0, LLAMA3),
                                                    (128, 500000.0, (8.0, 1.0, 4.0, 8192)),
                                                    (128, 500000.0, (32.0, 1.0, 4.0, 8192))],
                         ids=["test-model", "llama-3.1-8b", "llama-3.2-1b"])
def test_llama3_rope_frequencies_equal_transformers(head_dim, theta, scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minigpt.attention import rope_frequencies

    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=4 * scaling[3],
                         rope_parameters=llama3_parameters(scaling, theta))
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert attention_factor == 1.0  # LLaMA-3.1's rescaling leaves the scores' scale alone
    ours = rope_frequencies(head_dim, theta, scaling)
    plain = rope_frequencies(head_dim, theta)
    # transformers computes in float32: 1e-6 relative
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    factor, low, high, context = scaling
    turns = context * plain / (2 * torch.pi)
    assert torch.equal(ours[turns > high], plain[turns > high])  # fast pairs kept
    torch.testing.assert_close(ours[turns < low], plain[turns < low] / factor, rtol=1e-15, atol=0)  # slowed
    blended = (turns >= low) & (turns <= high)
    assert blended.any()
    assert ((ours[blended] <= plain[blended]) & (ours[blended] >= plain[blended] / factor)).all()


def test_llama3_rope_models_equal_transformers_both_ways(tmp_path):
    ours = llama("llama", 2, rope_scaling=LLAMA3)
    hf = ours.to_hf()
    assert hf.config.rope_parameters == llama3_parameters()
    x = prompts(t=48)  # past the 16 positions of the "pretraining" context
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, **TOL)
        back = GPT.from_hf(hf).eval()
        assert back.config.rope_scaling == LLAMA3
        torch.testing.assert_close(back(x)[0], hf(x).logits, **TOL)
        hf.save_pretrained(tmp_path)
        torch.testing.assert_close(GPT.from_pretrained(tmp_path).eval()(x)[0], hf(x).logits, **TOL)
        unscaled = llama("llama", 2)  # the same weights (same seed): the rescaling changes the logits
        assert (unscaled(x)[0] - ours(x)[0]).abs().max() > 1e-3
    tokens = generate(ours, x[:1, :8], 20, do_sample=False)
    assert torch.equal(tokens, hf.generate(x[:1, :8], max_new_tokens=20, do_sample=False))


@pytest.mark.parametrize("scaling", [(0.5, 1.0, 4.0, 16), (8.0, 4.0, 1.0, 16), (8.0, 0.0, 4.0, 16),
                                     (8.0, 1.0, 4.0, 0), (8.0, 1.0, 4.0, 16.0), (8.0, 1.0, 4.0),
                                     "llama3", (8.0, float("nan"), 4.0, 16)])
def test_bad_rope_scaling_is_named(scaling):
    with pytest.raises(ValueError, match="rope_scaling="):
        llama("llama", 2, rope_scaling=scaling)


def test_rope_scaling_needs_rope():
    with pytest.raises(ValueError, match="needs positions='rope'"):
        GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=8, rope_scaling=LLAMA3)


def test_unsupported_transformers_settings_are_named():
    hf = llama("llama", 2).to_hf()
    hf.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        GPT.from_hf(hf)
    hf = llama("llama", 2).to_hf()
    hf.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        GPT.from_hf(hf)
    with pytest.raises(ValueError, match="positions='learned'"):
        GPT(GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=8, norm="rmsnorm",
                      mlp="swiglu")).to_hf()
    with pytest.raises(ValueError, match="qkv_bias=False with bias=True"):
        llama("llama", 2, bias=True, qkv_bias=False).to_hf()


@pytest.mark.parametrize("field, value, message", [
    ("norm", "batchnorm", "norm='batchnorm' must be one of layernorm, rmsnorm"),
    ("mlp", "relu", "mlp='relu' must be one of gelu, swiglu"),
    ("positions", "alibi", "positions='alibi' must be one of learned, rope, none"),
    ("n_kv_head", 3, "n_kv_head=3 must divide n_head=4"),
    ("n_kv_head", 0, "n_kv_head=0 must be a positive integer"),
    ("mlp_hidden", -1, "mlp_hidden=-1 must be a positive integer"),
    ("rope_theta", 0.5, "rope_theta=0.5 must be a finite number greater than 1"),
    ("qkv_bias", "yes", "qkv_bias='yes' must be True, False or None"),
    ("tie_embeddings", 1, "tie_embeddings=1 must be True or False"),
])
def test_bad_options_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(n_head=4, n_embd=64, **{field: value})


def test_rope_needs_an_even_head_size():
    with pytest.raises(ValueError, match="head size 9 must be even"):
        GPTConfig(n_head=4, n_embd=36, positions="rope")


def test_gpt2_only_code_names_the_option_it_cannot_take():
    config = GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=4, n_embd=32, block_size=8, n_kv_head=2)
    with pytest.raises(ValueError, match="megatron_gpt takes GPT-2-style models only; this one has "
                                         "n_kv_head=2"):
        require_gpt2(config, "megatron_gpt")
    from minigpt.parallel.tensor import megatron_gpt

    with pytest.raises(ValueError, match="n_kv_head=2"):
        megatron_gpt(GPT(config), 0, 2)
    from minigpt.parallel.pipeline import GPTStage

    with pytest.raises(ValueError, match="GPTStage takes GPT-2-style models only; this one has n_kv_head=2"):
        GPTStage(GPT(config), 0, 1)


def test_the_two_rope_layouts_are_one_rotation_in_a_reordered_basis():
    """Interleaved pairs (x[2i], x[2i+1]) and half-split pairs (x[i], x[i + d/2]) rotate by the same
    angles: permuting the dimensions maps one onto the other."""
    d = 16
    x = torch.randn(2, 3, 10, d, dtype=torch.float64)
    to_half = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # [0, 2, ..., 1, 3, ...]
    interleaved = RotaryEmbedding(d, 500.0, interleaved=True)(x, offset=3)
    half = RotaryEmbedding(d, 500.0, interleaved=False)(x[..., to_half], offset=3)
    torch.testing.assert_close(half, interleaved[..., to_half], atol=1e-12, rtol=0)


def test_flops_per_token_counts_what_torch_counts():
    """flops_per_token against torch's own FLOP counter on a forward pass, for GQA and SwiGLU."""
    model = llama("llama", 1, n_layer=3, mlp_hidden=80)
    for m in model.modules():  # the counter does not see the CPU SDPA kernel: count attention's matmuls
        if isinstance(m, MultiHeadAttention):
            m.use_sdpa = False
    x = prompts(batch=2, t=48)  # block_size: flops_per_token's default context
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == flops_per_token(model.config)["forward"] * x.numel()


# --- prompts of different lengths --------------------------------------------------------------------

BATCH = [[5, 6, 7], [1, 2, 3, 4, 5], [9]]  # lengths 3, 5 and 1


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("cache", [True, False])
def test_a_ragged_batch_generates_what_each_prompt_generates_alone(style, cache):
    model = llama("llama", 2) if style == "llama" else GPT(GPTConfig(
        vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=48)).eval()
    together = generate(model, BATCH, 12, do_sample=False, use_cache=cache)
    assert isinstance(together, list) and [len(r) for r in together] == [15, 17, 13]
    for prompt, row in zip(BATCH, together):
        alone = generate(model, prompt, 12, do_sample=False)[0]
        assert torch.equal(row, alone)


def test_a_ragged_batch_stops_each_row_at_its_stop_token():
    model = llama("llama", 2)
    free = [generate(model, p, 12, do_sample=False)[0] for p in BATCH]
    stop = int(free[1][7])  # a token that row 1 emits in the middle of its continuation
    together = generate(model, BATCH, 12, do_sample=False, stop_tokens=[stop])
    for prompt, row in zip(BATCH, together):
        alone = generate(model, prompt, 12, do_sample=False, stop_tokens=[stop])[0]
        new = alone[len(prompt):]
        hits = (new == stop).nonzero()
        expected = alone[:len(prompt) + int(hits[0]) + 1] if len(hits) else alone
        assert torch.equal(row, expected)
    assert together[1][-1] == stop


def test_a_left_padded_tensor_with_an_attention_mask_matches_transformers():
    model = llama("llama", 2)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    theirs = model.to_hf().generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                    pad_token_id=0)
    assert torch.equal(generate(model, ids, 10, do_sample=False, attention_mask=mask), theirs)


@pytest.mark.parametrize("prompts_, kw, message", [
    ([[1, 2], []], {}, "prompt 1 must be a non-empty list of token ids; got nothing"),
    ([[1, 2], [[3, 4]]], {}, r"prompt 1 must be a non-empty list of token ids; got shape \(1, 2\)"),
    ([[1, 2], [3]], {"attention_mask": torch.ones(2, 2)}, "pass attention_mask only with a"),
    (torch.tensor([[1, 2, 0]]), {"attention_mask": torch.tensor([[1, 1, 0]])}, "must pad on the left"),
    (torch.tensor([[1, 2, 3]]), {"attention_mask": torch.tensor([[1, 2, 1]])}, "must be 0s and 1s"),
    ([[1] * 40, [2]], {}, "padded to 40 tokens plus max_new_tokens=10 exceed block_size=48"),
])
def test_a_batch_the_function_cannot_take_is_named(prompts_, kw, message):
    with pytest.raises(ValueError, match=message):
        generate(llama("llama", 2), prompts_, 10, do_sample=False, **kw)


def test_a_llama_style_model_trains_and_resumes(tmp_path):
    from tiny_training import TRAIN, VAL, small_model

    from minigpt.train import TrainConfig, Trainer, model_from_checkpoint

    model = small_model(n_head=4, n_kv_head=2, dropout=0.0, **LLAMA_STYLE)
    config = model.config
    trainer = Trainer(model, TRAIN, VAL, TrainConfig(
        max_steps=40, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=4, eval_interval=20,
        eval_batches=2, checkpoint_interval=0, progress=False, device="cpu", bf16="off"), out_dir=tmp_path)
    history = trainer.train()
    assert history[-1]["val"] < history[0]["val"]
    model, _ = model_from_checkpoint(tmp_path)
    assert model.config == config and model.transformer.h[0].attn.n_kv_head == 2
    for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)
