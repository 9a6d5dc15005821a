"""wafer.shape and the workload built from it: parameter counts against minigpt's and Hugging Face's
modules and the released weights, the workload's FLOPs against torch's counter, and a gated,
grouped-query config's ops by hand."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minigpt.attention import MultiHeadAttention
from minigpt.model import GPT, LLAMA_STYLE, GPTConfig
from wafer.shape import (
    CODELLAMA_34B,
    LLAMA2_13B,
    LLAMA3_8B,
    QWEN2_72B,
    SHAPES,
    as_config,
    kv_bytes_per_token,
    kv_width,
    label,
    layer_params,
    norm_params,
    params,
    products,
)
from wafer.workload import gpt_workload

# A LLaMA-like config small enough to count by hand: grouped-query attention (2 KV heads for 4), a
# gated MLP, no biases, an untied head, rotary positions (no table).
SMALL_LLAMA = GPTConfig(**LLAMA_STYLE, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=96,
                        vocab_size=100, block_size=128)
# Qwen2: biases on q, k and v only; Qwen3: a head size set apart from n_embd / n_head (4 heads of 24 in a
# 64-wide model) and RMSNorms on each head's query and key.
SMALL_QWEN2 = GPTConfig(**LLAMA_STYLE, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=100,
                        block_size=64, qkv_bias=True)
SMALL_QWEN3 = GPTConfig(**LLAMA_STYLE, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_size=24,
                        mlp_hidden=80, vocab_size=100, block_size=64, qk_norm=True)
# The released models' parameter counts. LLaMA-3-8B's and LLaMA-2-13B's are the released weights'
# (chapter 13); CodeLLaMA-34B's and Qwen2-72B's are those of minigpt's GPT and of the transformers model
# that GPT.to_hf builds from the config, on the meta device (both agree; the test below checks it).
RELEASED = {"LLaMA-3-8B": 8_030_261_248, "LLaMA-2-13B": 13_015_864_320, "CodeLLaMA-34B": 33_743_970_304,
            "Qwen2-72B": 72_706_203_648}


def _meta(config):
    with torch.device("meta"):  # shapes only: no memory for the weights
        return GPT(config)


@pytest.mark.parametrize("config", [
    GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=500),
    GPTConfig(n_layer=3, n_head=2, n_embd=96, block_size=17, vocab_size=300, bias=False),
    GPTConfig(n_layer=1, n_head=1, n_embd=32, block_size=16, vocab_size=50, bias=False),
])
def test_params_count_minigpt_parameters_of_gpt2(config):
    model = GPT(config)
    assert params(config) == model.num_parameters() == gpt_workload(config).params
    assert as_config(model) is config and as_config(config) is config
    assert kv_width(config) == config.n_embd  # multi-head attention: as many key-value heads as heads
    assert products(config)[2] == ("mlp in", 4 * config.n_embd, config.n_embd)  # GELU's 4x, one matrix
    ops = {op.name: op for op in gpt_workload(config).ops}
    assert ops["wpe"].weight_params == config.block_size * config.n_embd and "h0.mlp.gelu" in ops
    head = ops["lm_head"]  # tied: it reads the token embedding and owns nothing
    assert head.weight_params == 0 and head.reads_params == config.vocab_size * config.n_embd
    assert norm_params(config) == (2 if config.bias else 1) * config.n_embd  # LayerNorm's shift with bias


@pytest.mark.parametrize("config", [
    GPTConfig(),  # GPT-2 small, 124M
    SMALL_LLAMA,
    GPTConfig(**LLAMA_STYLE, n_layer=2, n_embd=64, n_head=4, n_kv_head=1, vocab_size=100, block_size=64),
    dataclasses.replace(SMALL_LLAMA, bias=True),  # LLaMA with attention_bias and mlp_bias
    SMALL_QWEN2,
    SMALL_QWEN3,
    # chapter 03's options one at a time: SwiGLU beside LayerNorm with biases, no positions, untied
    GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=32, mlp="swiglu", positions="none",
              tie_embeddings=False),
], ids=["gpt2-small", "llama-gqa", "llama-mqa", "llama-biased", "qwen2", "qwen3", "gpt2-options"])
def test_params_count_the_modules_minigpt_builds(config):
    """An independent count: the parameters of the modules torch builds, on the meta device."""
    model = _meta(config)
    assert params(config) == model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert params(config) == gpt_workload(config, 8).params
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    assert layer_params(config) * config.n_layer == blocks
    assert norm_params(config) == sum(p.numel() for p in model.transformer.ln_f.parameters())


@pytest.mark.parametrize("config", [SMALL_LLAMA, SMALL_QWEN2, SMALL_QWEN3], ids=["llama", "qwen2", "qwen3"])
def test_params_count_the_hugging_face_models_of_the_llama_family(config):
    hf = GPT(config).to_hf()  # small enough to build for real
    kind = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    assert type(hf).__name__ == kind[hf.config.model_type]
    assert params(config) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_parameter_counts(name):
    config = SHAPES[name]
    model = _meta(config)
    with torch.device("meta"):
        hf = model.to_hf()
    assert params(config) == RELEASED[name] == model.num_parameters()
    assert params(config) == sum(p.numel() for p in hf.parameters())
    family = "Qwen2" if name == "Qwen2-72B" else "Llama"
    assert label(config) == name and type(hf).__name__ == family + "ForCausalLM"


def test_released_configs_follow_their_published_config_json():
    assert (LLAMA3_8B.n_layer, LLAMA3_8B.n_embd, LLAMA3_8B.n_head, LLAMA3_8B.kv_heads, LLAMA3_8B.ffn_hidden,
            LLAMA3_8B.vocab_size, LLAMA3_8B.rope_theta, LLAMA3_8B.block_size) == (
        32, 4096, 32, 8, 14336, 128256, 500000.0, 8192)
    assert (LLAMA2_13B.kv_heads, LLAMA2_13B.block_size, LLAMA2_13B.rope_theta) == (40, 4096, 10000.0)
    assert (CODELLAMA_34B.kv_heads, CODELLAMA_34B.block_size, CODELLAMA_34B.rope_theta) == (8, 16384, 1e6)
    assert QWEN2_72B.qkv_bias and not QWEN2_72B.bias and QWEN2_72B.block_size == 32768
    for config in SHAPES.values():
        assert (config.norm, config.mlp, config.positions, config.tie_embeddings) == ("rmsnorm", "swiglu",
                                                                                      "rope", False)
    # Qwen2's biases on q, k and v: 8,192 + 2 x 1,024 per layer, which a count without them misses
    plain = dataclasses.replace(QWEN2_72B, qkv_bias=None)
    assert params(QWEN2_72B) - params(plain) == 80 * (8192 + 2 * 1024)
    assert label(plain) == "GPT 80x8192" and label(GPTConfig()) == "GPT 12x768"


@pytest.mark.parametrize("config", [LLAMA3_8B, CODELLAMA_34B, QWEN2_72B, SMALL_LLAMA],
                         ids=["llama3-8b", "codellama-34b", "qwen2-72b", "small"])
def test_released_configs_count_hugging_face_parameters_built_from_their_fields(config):
    """The transformers model built from the published fields directly (not through GPT.to_hf)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    fields = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd,
                  intermediate_size=config.ffn_hidden, num_hidden_layers=config.n_layer,
                  num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads,
                  tie_word_embeddings=False)
    with torch.device("meta"):
        if config.qkv_bias:  # Qwen2: biases on q, k and v
            hf = Qwen2ForCausalLM(Qwen2Config(**fields))
        else:
            hf = LlamaForCausalLM(LlamaConfig(**fields))
    assert params(config) == sum(p.numel() for p in hf.parameters()) == gpt_workload(config, 8).params


def test_shape_from_hugging_face_gpt2_config():
    from transformers import GPT2Config, LlamaConfig

    config = as_config(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=100))
    fields = (config.n_layer, config.n_embd, config.block_size, config.vocab_size, config.bias)
    assert fields == (2, 64, 32, 100, True)
    assert config.is_gpt2 and config.ffn_hidden == 4 * 64
    assert as_config(GPT2Config(n_layer=1, n_head=2, n_embd=64, n_inner=96)).ffn_hidden == 96
    with pytest.raises(ValueError, match="model_type='llama': .* GPT.from_hf"):
        as_config(LlamaConfig())
    with pytest.raises(ValueError, match="n_expert=4: the wafer model counts a dense MLP"):
        as_config(GPTConfig(n_layer=1, n_head=2, n_embd=64, n_expert=4))


def test_gated_grouped_query_workload_by_hand():
    d, kv, f, v, t = 64, 32, 96, 100, 10  # kv: 2 heads of 16
    w = gpt_workload(SMALL_LLAMA, context=t)
    assert w.config is SMALL_LLAMA and w.n_embd == d and w.n_layer == 2 and w.context == t
    layer = (d * (d + 2 * kv)) + d * d + d * 2 * f + f * d + 2 * d  # qkv, out, gate and up, down, two norms
    assert w.params == params(SMALL_LLAMA) == 2 * layer + v * d + v * d + d  # embedding, head, final norm
    ops = {op.name: op for op in w.ops}
    assert "wpe" not in ops and "embed.add" not in ops and "h0.mlp.gelu" not in ops
    assert ops["h0.attn.c_attn"].activation_elems == d + 2 * kv and ops["h0.attn.c_attn"].inputs == d
    assert ops["h0.mlp.c_fc"].flops == 2 * d * 2 * f and ops["h0.mlp.c_proj"].inputs == f
    assert ops["h0.mlp.swiglu"].activation_elems == f and ops["h0.ln_1"].weight_params == d
    assert ops["lm_head"].weight_params == v * d and ops["lm_head"].reads_params == 0
    assert ops["h1.attn.scores"].flops == 2 * t * d  # every query head against t keys
    assert w.kv_elems_per_token == 2 * kv * 2 and kv_bytes_per_token(SMALL_LLAMA, "fp32") == 2 * 2 * kv * 4
    per_layer = 2 * (d * (d + 2 * kv) + d * d + d * 2 * f + f * d) + 4 * t * d
    assert w.forward_flops() == 2 * per_layer + 2 * d * v


def test_qwen_workloads_by_hand():
    d, q, kv, v = 64, 96, 48, 100  # Qwen3: 4 query heads and 2 key-value heads of 24
    ops = {op.name: op for op in gpt_workload(SMALL_QWEN3, context=8).ops}
    assert ops["h0.attn.c_attn"].weight_params == d * (q + 2 * kv)  # no biases
    assert ops["h0.attn.qk_norm"].weight_params == 2 * 24 and ops["h0.attn.c_proj"].inputs == q
    assert ops["h0.attn.scores"].flops == 2 * 8 * q and kv_width(SMALL_QWEN3) == kv
    qwen2 = {op.name: op for op in gpt_workload(SMALL_QWEN2, context=8).ops}
    assert qwen2["h0.attn.c_attn"].weight_params == d * (d + 2 * 32) + d + 2 * 32  # q, k and v biased
    assert qwen2["h0.attn.c_proj"].weight_params == d * d  # o_proj and the MLP unbiased
    assert qwen2["h0.mlp.c_fc"].weight_params == d * 2 * SMALL_QWEN2.ffn_hidden
    assert "h0.attn.qk_norm" not in qwen2 and qwen2["h0.ln_1"].weight_params == d  # RMSNorm: a scale only
    assert qwen2["lm_head"].weight_params == v * d


def _matmul_flops(model, x):
    for m in model.modules():  # the CPU SDPA kernel is invisible to FlopCounterMode: count the matmuls
        if isinstance(m, MultiHeadAttention):
            m.use_sdpa = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / x.numel()


@pytest.mark.parametrize("config", [SMALL_LLAMA, SMALL_QWEN2, SMALL_QWEN3], ids=["llama", "qwen2", "qwen3"])
def test_llama_family_workload_flops_equal_torch(config):
    torch.manual_seed(0)
    t = 16
    x = torch.randint(0, config.vocab_size, (2, t))
    assert gpt_workload(config, context=t).forward_flops() == _matmul_flops(GPT(config), x)


def test_the_context_defaults_to_the_block_size_and_is_bounded_by_it():
    # learned positions or not, minigpt's model takes no sequence longer than its block size
    assert gpt_workload(SMALL_LLAMA).context == SMALL_LLAMA.block_size == 128
    assert gpt_workload(SMALL_LLAMA, 100).context == 100
    with pytest.raises(ValueError, match=r"context=129 must be an integer in \[1, 128\] \(the block size\)"):
        gpt_workload(SMALL_LLAMA, 129)
    with pytest.raises(ValueError, match=r"context=0 must be an integer in \[1, 128\]"):
        gpt_workload(SMALL_LLAMA, 0)
