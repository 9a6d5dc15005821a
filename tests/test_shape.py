"""wafer.shape and the workload built from it: parameter counts against minigpt's and Hugging Face's
modules and the released weights, and a gated, grouped-query shape's ops by hand."""

import pytest
import torch

from minigpt.model import GPT, GPTConfig
from wafer.shape import CODELLAMA_34B, LLAMA2_13B, LLAMA3_8B, Shape
from wafer.workload import gpt_workload

# A LLaMA-like shape small enough to count by hand: grouped-query attention (2 KV heads for 4), a
# gated MLP, no biases, an untied head, rotary positions (no table).
SMALL_LLAMA = Shape("small", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ffn=96, vocab=100)


@pytest.mark.parametrize("config", [
    GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=500),
    GPTConfig(n_layer=3, n_head=2, n_embd=96, block_size=17, vocab_size=300, bias=False),
    GPTConfig(n_layer=1, n_head=1, n_embd=32, block_size=16, vocab_size=50, bias=False),
])
def test_shape_from_config_counts_minigpt_parameters(config):
    shape = Shape.from_config(config)
    model = GPT(config)
    assert shape.params == model.num_parameters() == gpt_workload(config).params
    assert Shape.from_config(model) == shape
    assert (shape.bias, shape.positions, shape.n_kv_head) == (config.bias, config.block_size, config.n_head)
    assert (shape.gated, shape.tied, shape.d_ffn) == (False, True, 4 * config.n_embd)


def test_shape_from_hugging_face_gpt2_config():
    from transformers import GPT2Config

    shape = Shape.from_config(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=100))
    assert (shape.n_layer, shape.d_model, shape.positions, shape.vocab, shape.bias) == (2, 64, 32, 100, True)


def test_released_parameter_counts():
    assert LLAMA3_8B.params == 8_030_261_248  # as the released weights count (chapter 13)
    assert LLAMA2_13B.params == 13_015_864_320


@pytest.mark.parametrize("shape", [LLAMA3_8B, CODELLAMA_34B, SMALL_LLAMA])
def test_llama_shapes_count_hugging_face_llama_parameters(shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_ffn,
                         num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
                         num_key_value_heads=shape.n_kv_head, tie_word_embeddings=False)
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = LlamaForCausalLM(config)
    assert shape.params == sum(p.numel() for p in model.parameters()) == gpt_workload(shape, 8).params


def test_gated_grouped_query_workload_by_hand():
    d, kv, f, v, t = 64, 32, 96, 100, 10  # kv: 2 heads of 16
    w = gpt_workload(SMALL_LLAMA, context=t)
    assert w.shape is SMALL_LLAMA and w.n_embd == d and w.n_layer == 2 and w.context == t
    layer = (d * (d + 2 * kv)) + d * d + d * 2 * f + f * d + 2 * d  # qkv, out, gate and up, down, two norms
    assert w.params == SMALL_LLAMA.params == 2 * layer + v * d + v * d + d  # embedding, head, final norm
    ops = {op.name: op for op in w.ops}
    assert "wpe" not in ops and "embed.add" not in ops and "h0.mlp.gelu" not in ops
    assert ops["h0.attn.c_attn"].activation_elems == d + 2 * kv and ops["h0.attn.c_attn"].inputs == d
    assert ops["h0.mlp.c_fc"].flops == 2 * d * 2 * f and ops["h0.mlp.c_proj"].inputs == f
    assert ops["h0.mlp.swiglu"].activation_elems == f and ops["h0.ln_1"].weight_params == d
    assert ops["lm_head"].weight_params == v * d and ops["lm_head"].reads_params == 0
    assert ops["h1.attn.scores"].flops == 2 * t * d  # every query head against t keys
    assert w.kv_elems_per_token == 2 * kv * 2
    per_layer = 2 * (d * (d + 2 * kv) + d * d + d * 2 * f + f * d) + 4 * t * d
    assert w.forward_flops() == 2 * per_layer + 2 * d * v


def test_a_shape_without_positions_needs_a_context():
    with pytest.raises(ValueError, match="context=None must be a positive integer"):
        gpt_workload(SMALL_LLAMA)
    assert gpt_workload(SMALL_LLAMA, 100_000).context == 100_000  # no table to bound it
