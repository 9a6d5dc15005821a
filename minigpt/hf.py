"""Hugging Face ``transformers`` models to and from minigpt's GPT: GPT-2 (``GPT2LMHeadModel``, whose
Conv1D weights are the transpose of ``nn.Linear``'s) and the LLaMA family (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, whose q, k and v become minigpt's fused ``c_attn`` and whose
gate and up projections its fused ``c_fc``). ``GPT.from_hf``, ``GPT.to_hf`` and ``GPT.from_pretrained``
call these.

Built in: 03_gpt
"""

from __future__ import annotations

import os
from typing import Any

import torch

from minigpt.model import GPT, GPTConfig, require_gpt2

LLAMA_FAMILY = ("llama", "qwen2", "qwen3")


def config_and_state(hf_model) -> tuple[GPTConfig, dict]:
    """The GPTConfig of a transformers causal language model and its weights under minigpt's names."""
    c = hf_model.config
    kind = getattr(c, "model_type", None)
    if kind == "gpt2":
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function={c.activation_function!r}: minigpt's MLP uses GELU "
                             f"with the tanh approximation ('gelu_new')")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=True,
                           layer_norm_epsilon=c.layer_norm_epsilon)
        return config, _gpt2_to_minigpt(hf_model.state_dict())
    if kind in LLAMA_FAMILY:
        config = _config_from_llama(c)
        return config, _llama_to_minigpt(hf_model.state_dict(), config)
    raise ValueError(f"model_type={kind!r}: minigpt reads gpt2, {', '.join(LLAMA_FAMILY)}")


def to_hf(model: GPT):
    """The transformers model with ``model``'s weights (see :meth:`minigpt.model.GPT.to_hf`)."""
    c = model.config
    if c.n_expert:
        raise ValueError(f"n_expert={c.n_expert}: a mixture of experts has no Hugging Face equivalent here")
    if c.mup:
        raise ValueError(f"mup_base_width={c.mup_base_width}: a muP model has no Hugging Face equivalent "
                         f"(its multipliers and attention scale differ)")
    if c.norm == "rmsnorm" or c.mlp == "swiglu" or c.positions == "rope":
        return _to_llama(model)
    require_gpt2(c, "GPT2LMHeadModel")
    if not c.bias:
        raise ValueError("bias=False has no GPT-2 equivalent: GPT-2 has biases everywhere")
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = c.vocab_size - 1
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True))
    return _loaded(hf, _minigpt_to_gpt2(model.state_dict()), tied=True)


def _loaded(hf, state: dict, tied: bool):
    """``hf`` with ``state`` loaded (a tied head may be left out of it) and, when ``tied``, its head
    tied to its embedding again; every other missing or unexpected name is an error."""
    missing, unexpected = hf.load_state_dict(state, strict=False)
    leftover = [k for k in missing if not (k == "lm_head.weight" and tied)] + list(unexpected)
    if leftover:
        raise RuntimeError(f"weights did not line up with {type(hf).__name__}: {leftover[:5]}")
    if tied:
        hf.tie_weights()
    return hf.eval()


def load_local(name_or_path: str | os.PathLike):
    """A transformers model read from this machine only (see :meth:`minigpt.model.GPT.from_pretrained`)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ImportError("GPT.from_pretrained needs the transformers package") from None
    text = os.path.expanduser(os.fspath(name_or_path))
    # a path, or a model name ("name" or "owner/name": no leading / . ~ and one / at most)
    is_path = (isinstance(name_or_path, os.PathLike) or os.path.isdir(text)
               or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text)
    if is_path and not os.path.isdir(text):
        raise FileNotFoundError(f"no directory {text!r}: pass a directory written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(text, local_files_only=True)
    except (OSError, ValueError) as e:  # transformers: files missing, or not a valid model name
        raise FileNotFoundError(_missing_weights(text, is_path, e)) from None
    if config.model_type not in ("gpt2", *LLAMA_FAMILY):
        raise ValueError(f"{text!r} holds a {config.model_type!r} model: minigpt reads gpt2, "
                         f"{', '.join(LLAMA_FAMILY)}")
    try:  # the config just read, not read again
        return AutoModelForCausalLM.from_pretrained(text, config=config, local_files_only=True,
                                                    dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(_missing_weights(text, is_path, e)) from None


def _missing_weights(name_or_path: str, is_path: bool, error: Exception) -> str:
    """What from_pretrained could not find, and how to get it without downloading at run time."""
    if is_path:
        return (f"{name_or_path!r} holds no model that transformers can read (a save_pretrained directory "
                f"has config.json and model.safetensors): {type(error).__name__}: {str(error)[:200]}")
    from huggingface_hub.constants import HF_HUB_CACHE

    return (f"{name_or_path!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}), and minigpt never "
            f"downloads. On a machine with internet access run `python -c \"from transformers import "
            f"AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{name_or_path}')\"`, then copy "
            f"that machine's Hugging Face cache here (or point HF_HOME at it); or pass a directory written "
            f"by save_pretrained")


# Hugging Face's GPT-2 uses Conv1D layers, whose weight is (in, out): the transpose of nn.Linear's.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_to_minigpt(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers in older versions
            continue
        out[k] = v.t() if k.endswith(_CONV1D) else v
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def _minigpt_to_gpt2(sd: dict) -> dict:
    return {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in sd.items()}


# --- LLaMA, Qwen2 and Qwen3 in transformers-----------------------------------------------------------

# minigpt's name -> transformers' names, concatenated along the output in this order
_LLAMA_NAMES = {
    "ln_1.weight": ["input_layernorm.weight"],
    "attn.c_attn.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.c_attn.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "attn.c_proj.weight": ["self_attn.o_proj.weight"],
    "attn.c_proj.bias": ["self_attn.o_proj.bias"],
    "attn.q_norm.weight": ["self_attn.q_norm.weight"],
    "attn.k_norm.weight": ["self_attn.k_norm.weight"],
    "ln_2.weight": ["post_attention_layernorm.weight"],
    "mlp.c_fc.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.c_fc.bias": ["mlp.gate_proj.bias", "mlp.up_proj.bias"],
    "mlp.c_proj.weight": ["mlp.down_proj.weight"],
    "mlp.c_proj.bias": ["mlp.down_proj.bias"],
}


def _rope(c) -> tuple[float, tuple[float, float, float, int] | None]:
    """RoPE's base and rescaling from a transformers config (``rope_parameters`` in transformers 5,
    ``rope_theta`` and ``rope_scaling`` before): LLaMA-3.1's "llama3" rescaling is read, any other
    (YaRN, linear, dynamic, ...) is refused by name."""
    params: dict = dict(getattr(c, "rope_parameters", None) or {})
    scaling = getattr(c, "rope_scaling", None)
    if params.get("rope_type", "default") == "default" and isinstance(scaling, dict):
        params.update(scaling)  # before transformers 5: the rescaling kept apart from the base
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope_type={kind!r}: minigpt's RoPE is the default one or LLaMA-3.1's 'llama3'")
    return theta, (params["factor"], params["low_freq_factor"], params["high_freq_factor"],
                   params["original_max_position_embeddings"])


def _config_from_llama(c) -> GPTConfig:
    kind = c.model_type
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={c.hidden_act!r}: minigpt's SwiGLU uses silu")
    if getattr(c, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True: minigpt's attention sees the whole context")
    attention_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
    if kind == "qwen2":  # q, k and v biased, o_proj and the MLP not
        bias, qkv_bias = False, True
    elif attention_bias != mlp_bias:
        raise ValueError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias}: minigpt's bias option "
                         f"sets both")
    else:
        bias, qkv_bias = attention_bias, None
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    theta, scaling = _rope(c)
    return GPTConfig(
        block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads, n_embd=c.hidden_size, dropout=0.0, bias=bias,
        layer_norm_epsilon=c.rms_norm_eps, norm="rmsnorm", mlp="swiglu", mlp_hidden=c.intermediate_size,
        positions="rope", rope_theta=theta, rope_scaling=scaling, n_kv_head=c.num_key_value_heads,
        head_size=None if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
        qkv_bias=qkv_bias, qk_norm=kind == "qwen3", tie_embeddings=bool(c.tie_word_embeddings))


def _llama_to_minigpt(sd: dict, config: GPTConfig) -> dict:
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(config.n_layer):
        for ours, theirs in _LLAMA_NAMES.items():
            names = [f"model.layers.{i}.{name}" for name in theirs]
            if all(name in sd for name in names):
                out[f"transformer.h.{i}.{ours}"] = torch.cat([sd[name] for name in names])
    return out


def _rope_parameters(c: GPTConfig) -> dict:
    """transformers' ``rope_parameters`` for a LLaMA-style config (the inverse of :func:`_rope`)."""
    if c.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": float(c.rope_theta)}
    factor, low, high, context = c.rope_scaling
    return {"rope_type": "llama3", "rope_theta": float(c.rope_theta), "factor": factor,
            "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": context}


def _to_llama(model: GPT):
    """The transformers model of a LLaMA-style GPT (see :meth:`GPT.to_hf`)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    c = model.config
    for name, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("positions", "rope")):
        if getattr(c, name) != want:
            raise ValueError(f"{name}={getattr(c, name)!r}: a LLaMA-style model (LLaMA, Qwen2, Qwen3) has "
                             f"{name}={want!r}")
    common: dict[str, Any] = dict(
                  vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
                  head_dim=c.head_dim, max_position_embeddings=c.block_size,
                  rms_norm_eps=c.layer_norm_epsilon,
                  rope_parameters=_rope_parameters(c),
                  tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0, hidden_act="silu",
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)  # minigpt has no special ids
    qkv_bias = c.bias if c.qkv_bias is None else c.qkv_bias
    if c.qk_norm:
        if c.bias != qkv_bias:
            raise ValueError(f"qkv_bias={c.qkv_bias} with bias={c.bias}: Qwen3 biases q, k, v and o together")
        if c.bias:
            raise ValueError("bias=True: Qwen3's MLP has no biases")
        hf: Any = Qwen3ForCausalLM(Qwen3Config(**common, attention_bias=False))
    elif qkv_bias and not c.bias:
        hf = Qwen2ForCausalLM(Qwen2Config(**common))
    elif qkv_bias != c.bias:
        raise ValueError(f"qkv_bias={c.qkv_bias} with bias={c.bias}: neither LLaMA nor Qwen2 has that")
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, attention_bias=c.bias, mlp_bias=c.bias))
    sd, state = model.state_dict(), {}
    state["model.embed_tokens.weight"] = sd["transformer.wte.weight"]
    state["model.norm.weight"] = sd["transformer.ln_f.weight"]
    state["lm_head.weight"] = sd["lm_head.weight"]
    widths = {"attn.c_attn": [c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim],
              "mlp.c_fc": [c.ffn_hidden, c.ffn_hidden]}
    for i in range(c.n_layer):
        for ours, theirs in _LLAMA_NAMES.items():
            t = sd.get(f"transformer.h.{i}.{ours}")
            if t is None:
                continue
            parts = t.split(widths[ours.rsplit(".", 1)[0]]) if len(theirs) > 1 else [t]
            for name, part in zip(theirs, parts):
                state[f"model.layers.{i}.{name}"] = part
    return _loaded(hf, state, c.tie_embeddings)
