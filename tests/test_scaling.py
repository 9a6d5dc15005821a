"""Scaling: FLOP counts, power-law fits (a known law from noisy points; Cerebras-GPT's losses), muP."""

import math

import numpy as np
import pytest
import torch

from minigpt.attention import record_attention
from minigpt.data import story_corpus
from minigpt.model import GPT, GPTConfig
from minigpt.scaling import (
    CEREBRAS_GPT,
    MODEL_ZOO_FLOPS,
    cerebras_gpt_published_law,
    compute_optimal_params,
    compute_optimal_tokens,
    coordinate_check,
    fit_power_law,
    model_zoo_flops,
    training_flops,
    training_flops_6nd,
)
from minigpt.tokenizer import CharTokenizer
from minigpt.train import TrainConfig, Trainer, model_from_checkpoint


@pytest.mark.parametrize("a, b, E, seed", [(50.0, 0.15, 1.2, 0), (8.0, 0.07, 0.5, 1), (1e4, 0.3, 2.0, 2)])
def test_fit_recovers_a_known_law_from_noisy_points(a, b, E, seed):
    rng = np.random.default_rng(seed)
    c = np.logspace(12, 20, 12)
    clean = a * c**-b + E
    noise = 0.003
    loss = clean * (1 + noise * rng.standard_normal(len(c)))
    fit = fit_power_law(c, loss)
    # within 4 reported standard errors, and the errors are honest (not huge, not zero)
    assert abs(fit.b - b) < 4 * fit.b_err and 0 < fit.b_err < 0.2 * b
    assert abs(fit.E - E) < 4 * fit.E_err and fit.E_err > 0
    assert abs(math.log(fit.a / a)) < 4 * fit.a_err / fit.a
    assert np.allclose(fit(c), clean, rtol=3 * noise)


def test_exact_points_are_fit_exactly():
    c = np.logspace(10, 22, 8)
    fit = fit_power_law(c, 20 * c**-0.1 + 1.5)
    assert fit.b == pytest.approx(0.1, rel=1e-6) and fit.E == pytest.approx(1.5, rel=1e-6)
    assert fit.a == pytest.approx(20, rel=1e-5) and fit.rms_residual < 1e-9


def test_cerebras_gpt_fit_reproduces_the_published_losses_within_1_percent():
    flops = np.array([m.flops_eval_table for m in CEREBRAS_GPT])
    loss = np.array([m.pile_loss for m in CEREBRAS_GPT])
    fit = fit_power_law(flops, loss)
    assert np.abs(fit(flops) / loss - 1).max() < 0.01
    # the published law does too, and the two laws agree over the range of the points
    assert np.abs(cerebras_gpt_published_law(flops) / loss - 1).max() < 0.01
    grid = np.logspace(math.log10(flops.min()), math.log10(flops.max()), 20)
    assert np.abs(fit(grid) / cerebras_gpt_published_law(grid) - 1).max() < 0.01


def test_flop_counts_against_cerebras_gpt():
    """6ND < our matmul count < the paper's counts, for all seven models; 6ND leaves out attention over
    the 2048-token context. The training table is our count with the token embedding counted as a
    matrix product, within 5% (its figures have two significant digits; the 111M row is the worst)."""
    for m in CEREBRAS_GPT:
        config = m.config
        d = m.d_model
        n = config.n_layer * (12 * d * d + 13 * d) + 50257 * d + 2048 * d + 2 * d  # tested in chapter 03
        counted = training_flops(config, m.tokens)
        assert training_flops_6nd(n, m.tokens) < counted < m.flops_eval_table, m.name
        assert m.flops_training_table < m.flops_eval_table, m.name
        assert 0.7 < counted / m.flops_eval_table < 0.95, m.name
        with_embedding = training_flops(config, m.tokens, embedding_matmul=True)
        assert abs(with_embedding / m.flops_training_table - 1) < 0.05, (m.name, with_embedding)
    assert training_flops_6nd(1e6, 1e3) == 6e9
    assert GPT(CEREBRAS_GPT[0].config).num_parameters() == (
        10 * (12 * 768**2 + 13 * 768) + 50257 * 768 + 2048 * 768 + 2 * 768)


def test_model_zoo_flops_reproduce_the_quoted_figures_and_the_training_table():
    """The Model Zoo's four-digit training FLOPs within 0.02%; the training table's two digits on every
    row but 111M's (2.5e18 printed, 2.2e18 counted)."""
    by_name = {m.name: m for m in CEREBRAS_GPT}
    for name, (quoted, tokens) in MODEL_ZOO_FLOPS.items():
        assert abs(model_zoo_flops(by_name[name].config, tokens) / quoted - 1) < 2e-4, name
    from wafer.streaming import CEREBRAS_GPT_RUNS  # the runs' steps x batch, from the Model Zoo configs

    for m in CEREBRAS_GPT:
        tokens = sum(run.tokens(2048) for run in CEREBRAS_GPT_RUNS[m.name])
        counted = float(f"{model_zoo_flops(m.config, tokens):.1e}")
        assert (counted == m.flops_training_table) == (m.name != "111M"), (m.name, counted)
    # by hand: 1 layer, 2 heads, d = 4, V = 10, T = 8; one token
    config = GPTConfig(n_layer=1, n_head=2, n_embd=4, block_size=8, vocab_size=10)
    matmuls = 3 * (24 * 16 + 4 * 8 * 4 + 2 * 4 * 10)
    assert model_zoo_flops(config, 1) == matmuls + 3 * (3 * 2 * 8) + 4 * 4 * 10
    assert model_zoo_flops(config, 1, context=4) == 3 * (24 * 16 + 4 * 4 * 4 + 2 * 4 * 10) + 9 * 2 * 4 + 160


def test_compute_optimal_sizes():
    assert compute_optimal_tokens(1e8) == 2e9
    n = compute_optimal_params(6 * 20 * 1e8**2)
    assert n == pytest.approx(1e8)
    with pytest.raises(ValueError, match="flops=-1"):
        compute_optimal_params(-1)


def test_bad_fits_are_refused():
    with pytest.raises(ValueError, match="at least 4"):
        fit_power_law([1, 2, 3], [3, 2, 1])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 1, 2, 3], [4, 3, 2, 1])


# --- muP -----------------------------------------------------------------------------------------------

def _tiny(width=32, **kw):
    return GPTConfig(n_layer=2, n_head=4, n_embd=width, block_size=16, vocab_size=40, **kw)


def test_mup_at_its_base_width_is_the_standard_model():
    idx = torch.randint(40, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    sp = GPT(_tiny())
    torch.manual_seed(0)
    mup = GPT(_tiny(mup_base_width=32))
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mup.state_dict().values()))
    assert torch.equal(sp(idx)[0], mup(idx)[0])
    # the two multipliers act where they say: the logits scale with the output multiplier
    torch.manual_seed(0)
    doubled = GPT(_tiny(mup_base_width=32, mup_output_mult=2.0))
    assert torch.allclose(doubled(idx)[0], 2 * sp(idx)[0], rtol=1e-6, atol=1e-7)


def test_mup_initialisation_learning_rates_and_attention_scale_follow_the_width():
    torch.manual_seed(0)
    wide = GPT(_tiny(256, mup_base_width=32))  # 8 times the base width
    m = 8.0
    assert wide.config.width_mult == m
    multipliers = wide.lr_multipliers()
    hidden = {n for n, p in wide.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert set(multipliers) == hidden and len(hidden) == 2 * 4
    assert all(v == 1 / m for v in multipliers.values())
    params = dict(wide.named_parameters())
    # hidden matrices start 1/sqrt(m) smaller; embeddings keep the base's 0.02
    assert params["transformer.h.0.mlp.c_fc.weight"].std().item() == pytest.approx(
        0.02 / math.sqrt(m), rel=0.02)
    assert params["transformer.h.0.attn.c_proj.weight"].std().item() == pytest.approx(
        0.02 / math.sqrt(m) / math.sqrt(2 * 2), rel=0.03)
    assert params["transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    # attention: 1/head_dim, equal to SP's 1/sqrt(head_dim) at the base width
    assert wide.config.attention_scale == pytest.approx(math.sqrt(32 / 4) / 64)
    assert GPT(_tiny(mup_base_width=32)).config.attention_scale == pytest.approx(1 / math.sqrt(8))
    assert wide.transformer.h[0].attn.scale == wide.config.attention_scale
    # the Trainer's optimizer gives each group its factor on the scheduled learning rate
    trainer = Trainer(wide, torch.randint(40, (200,)), torch.randint(40, (200,)),
                      TrainConfig(max_steps=1, batch_size=2, warmup_steps=0, progress=False, device="cpu"))
    trainer.train_step()
    for group in trainer.optimizer.param_groups:
        hidden_group = any(p is params[n] for n in hidden for p in group["params"])
        assert group["lr"] == pytest.approx(trainer.config.lr * (1 / m if hidden_group else 1.0))
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(params)


def test_mup_logits_at_any_width_match_the_written_out_attention():
    """SDPA's ``scale`` and the written-out attention agree under muP's 1/head_dim scaling."""
    torch.manual_seed(0)
    model = GPT(_tiny(64, mup_base_width=16)).eval()
    idx = torch.randint(40, (2, 16))
    with record_attention(model):  # forces the written-out path
        written = model(idx)[0]
    assert torch.allclose(model(idx)[0], written, atol=1e-5)


@pytest.fixture(scope="module")
def story_ids():
    text = story_corpus(200, seed=0)
    return torch.tensor(CharTokenizer.train(text).encode(text))


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp(story_ids):
    """After 5 Adam steps at lr 1e-2, widths 32 to 512: under SP the residual stream grows about 60x
    and the logits about 4x (measured); under muP every activation stays within 25% of the base's."""
    widths = [32, 64, 128, 256, 512]
    ratio = {}
    for base in (None, 32):
        config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=int(story_ids.max()) + 1,
                           mup_base_width=base)
        check = coordinate_check(config, widths, story_ids, steps=5, lr=1e-2)
        assert set(check) == set(widths) and all(len(records) == 6 for records in check.values())
        last = {w: check[w][-1] for w in widths}
        ratio[base] = {key: last[512][key] / last[32][key] for key in last[32]}
        for key in last[32]:  # the whole curve over width, not only its ends
            values = [last[w][key] for w in widths]
            ratio[base][key + " spread"] = max(values) / min(values)
    sp, mup = ratio[None], ratio[32]
    assert sp["block 1"] > 10 and sp["logits"] > 2, sp
    assert all(0.8 < mup[key] < 1.25 for key in mup if not key.endswith("spread")), mup
    assert all(mup[key] < 1.25 for key in mup if key.endswith("spread")), mup


def test_mup_bad_input():
    with pytest.raises(ValueError, match="mup_base_width=0"):
        _tiny(mup_base_width=0)
    with pytest.raises(ValueError, match="mup_output_mult=2.0 is a muP multiplier"):
        _tiny(mup_output_mult=2.0)
    with pytest.raises(ValueError, match="mup_input_mult=-1"):
        _tiny(mup_base_width=32, mup_input_mult=-1)
    with pytest.raises(ValueError, match="a muP model has no Hugging Face equivalent"):
        GPT(_tiny(mup_base_width=16)).to_hf()
    with pytest.raises(ValueError, match="widths=\\[30\\]"):
        coordinate_check(_tiny(), [30], torch.arange(40))


def test_a_mup_model_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(_tiny(64, mup_base_width=16, mup_input_mult=3.0))
    trainer = Trainer(model, torch.randint(40, (200,)), torch.randint(40, (200,)),
                      TrainConfig(max_steps=2, batch_size=2, warmup_steps=0, progress=False, device="cpu",
                                  eval_interval=2, eval_batches=1), out_dir=tmp_path)
    trainer.train()
    loaded, _ = model_from_checkpoint(tmp_path)
    idx = torch.randint(40, (1, 16))
    assert loaded.config == model.config
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])
