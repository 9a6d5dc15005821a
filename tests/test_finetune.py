"""Finetuning: classification head, instruction data with a masked loss, LoRA (chapter 05)."""

import re

import pytest
import torch
import torch.nn.functional as F

from minigpt.data import QUESTIONS, generate_stories, questions
from minigpt.finetune import (
    IGNORE,
    Examples,
    GPTClassifier,
    PromptTemplate,
    classification_accuracy,
    encode_conversation,
    encode_instruction,
    exact_match,
    greedy_complete,
    mean_loss,
)
from minigpt.generate import generate
from minigpt.lora import (
    LORA_TARGETS,
    LoRALinear,
    add_lora,
    load_adapters,
    lora_modules,
    lora_parameter_count,
    merge_lora,
    save_adapters,
    trainable_parameters,
    unmerge_lora,
)
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer
from minigpt.train import TrainConfig, Trainer

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=50)
TEMPLATE = PromptTemplate("{story}\nQ: {question}\nA: {response}")


def tiny(seed=0, config=TINY, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(config).to(dtype).eval()


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype) * 0.1)


@pytest.fixture(scope="module")
def story_tok():
    text = "".join(s.text + "\n" for s in generate_stories(300, 0))
    return BPETokenizer.train(text + "Q: Where did What color was the Who to give? A:", 400)


# --- LoRA ----------------------------------------------------------------------------------------------

def test_lora_is_also_importable_from_finetune():
    import minigpt.finetune
    import minigpt.lora

    for name in ("LORA_TARGETS", "LoRALinear", "add_lora", "load_adapters", "lora_modules", "merge_lora",
                 "save_adapters", "trainable_parameters", "unmerge_lora", "lora_parameter_count"):
        assert getattr(minigpt.finetune, name) is getattr(minigpt.lora, name), name


def test_lora_starts_equal_to_the_base_model():
    model = tiny()
    idx = torch.randint(50, (3, 20))
    before = model(idx)[0]
    add_lora(model, rank=4)
    assert torch.equal(model(idx)[0], before)  # B starts at zero: the update is exactly zero


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_merged_lora_equals_unmerged(dtype, atol):
    # Merging moves (alpha/r) B A into W: the same linear map, so only rounding differs. In float32
    # logits of size ~1 differ by a few ulps (~1e-7); 1e-6 leaves room. float64 shows the algebra.
    model = tiny(dtype=dtype)
    add_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    base = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    idx = torch.randint(50, (4, 30))
    with torch.no_grad():
        unmerged = model(idx)[0]
        merge_lora(model)
        assert all(m.merged for m in lora_modules(model).values())
        merged = model(idx)[0]
        unmerge_lora(model)
        again = model(idx)[0]
    assert (merged - unmerged).abs().max() < atol
    assert (again - unmerged).abs().max() < atol
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.base.weight, base[n], atol=atol, rtol=0)
    # the same model by hand: a plain GPT whose adapted weights are W + (alpha / r) B A
    by_hand = tiny(dtype=dtype)
    linears = dict(by_hand.named_modules())
    with torch.no_grad():
        for n, m in lora_modules(model).items():
            linears[n].weight += (8 / 4) * m.lora_B @ m.lora_A
        expected = by_hand(idx)[0]
    assert (unmerged - expected).abs().max() < atol


@pytest.mark.parametrize("rank", [1, 2, 8])
def test_trainable_parameters_equal_the_formula(rank):
    config = GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=40)
    c = config.n_embd
    model = GPT(config)
    names = add_lora(model, rank)
    assert len(names) == 4 * config.n_layer
    # per layer: c_attn C->3C, attn c_proj C->C, c_fc C->4C, mlp c_proj 4C->C: r(4C + 2C + 5C + 5C)
    assert trainable_parameters(model) == config.n_layer * rank * 16 * c
    shapes = [(m.in_features, m.out_features) for m in lora_modules(model).values()]
    assert lora_parameter_count(shapes, rank) == config.n_layer * rank * 16 * c
    # with a classification head left trainable: plus C x labels + labels
    clf = GPTClassifier(GPT(config), ["a", "b", "c"], pad_id=0)
    add_lora(clf, rank, trainable=("head",))
    assert trainable_parameters(clf) == config.n_layer * rank * 16 * c + 3 * c + 3


def test_only_adapters_learn():
    model = tiny().train()
    add_lora(model, rank=2, targets=("attn.c_attn",))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    idx = torch.randint(50, (2, 10))
    model(idx, idx)[1].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("rank", [0, -1, 17, 49, 2.5, True])
def test_bad_rank_is_rejected(rank):
    with pytest.raises(ValueError, match=re.escape(f"rank={rank!r} must be an integer from 1 to 16")):
        LoRALinear(torch.nn.Linear(16, 48), rank)


def test_lora_errors():
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        add_lora(tiny(), 2, targets=("nothing",))
    with pytest.raises(ValueError, match="alpha=-1.0 must be positive"):
        LoRALinear(torch.nn.Linear(4, 4), 2, alpha=-1)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(torch.nn.Conv1d(4, 4, 1), 2)


def test_adapters_save_and_load_alone(tmp_path):
    model = tiny()
    add_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    path = save_adapters(model, tmp_path / "adapters.pt")
    n_adapter = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
    saved = torch.load(path, weights_only=True)["tensors"]
    assert sum(t.numel() for t in saved.values()) == n_adapter  # the adapters only, no base weights
    fresh = tiny()  # the same base weights
    add_lora(fresh, rank=4, alpha=8)
    idx = torch.randint(50, (2, 12))
    assert torch.equal(fresh(idx)[0], tiny()(idx)[0])  # fresh adapters add exactly zero (B = 0)
    load_adapters(fresh, path)
    loaded = lora_modules(fresh)
    for n, m in lora_modules(model).items():
        assert torch.equal(loaded[n].lora_A, m.lora_A) and torch.equal(loaded[n].lora_B, m.lora_B), n
    assert torch.equal(fresh(idx)[0], model(idx)[0])

    other = tiny()
    add_lora(other, rank=2)
    with pytest.raises(ValueError, match="do not match"):
        load_adapters(other, path)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_adapters(model, tmp_path / "merged.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable adapter file"):
        load_adapters(fresh, tmp_path / "junk.pt")


# --- instruction data and the masked loss ----------------------------------------------------------

def test_template_needs_a_response_field_last():
    with pytest.raises(ValueError, match=r"has no \{response\} field"):
        PromptTemplate("Q: {question}\nA: {answer}")
    with pytest.raises(ValueError, match="must appear once, as the last field"):
        PromptTemplate("{response} is the answer to {question}")
    with pytest.raises(ValueError, match="must appear once"):
        PromptTemplate("{response} {response}")
    with pytest.raises(ValueError, match="positional or malformed"):
        PromptTemplate("{} {response}")
    with pytest.raises(ValueError, match=re.escape("lacks field(s) ['question']")):
        TEMPLATE.prompt({"story": "x", "response": "y"})
    with pytest.raises(ValueError, match="lacks the response field"):
        TEMPLATE.response({"story": "x", "question": "q"})


def test_template_moves_the_space_to_the_response(story_tok):
    example = {"story": "S.", "question": "Where?", "response": "park"}
    prompt, response = TEMPLATE.render(example)
    assert (prompt, response) == ("S.\nQ: Where?\nA:", " park")
    assert prompt + response == "S.\nQ: Where?\nA: park"
    assert PromptTemplate("{q} -> {response}!").render({"q": "x", "response": "y"}) == ("x ->", " y!")
    # tokenized apart, the pieces give the same tokens as the whole text: " park" stays one word
    ids = story_tok.encode(prompt) + story_tok.encode(response)
    assert ids == story_tok.encode(prompt + response)


def test_encode_instruction_targets_only_the_response(story_tok):
    eos = story_tok.special_tokens[ENDOFTEXT]
    example = {"story": "Tom went to the park.", "question": "Where did Tom go?", "response": "park"}
    x, y = encode_instruction(story_tok, TEMPLATE, example, eos)
    p = story_tok.encode(TEMPLATE.prompt(example))
    r = story_tok.encode(" park")
    assert x == p + r and len(y) == len(x)
    assert y == [IGNORE] * (len(p) - 1) + r + [eos]  # position i predicts token i + 1


def test_masked_loss_ignores_prompt_and_padding(story_tok):
    eos = story_tok.special_tokens[ENDOFTEXT]
    stories = generate_stories(3, 5)
    data = [questions(s, ["place"])[0] for s in stories] + [questions(stories[0], ["gift"])[0]]
    ex = Examples.for_instructions(story_tok, TEMPLATE, data, eos, pad_id=eos)
    x, y = ex.collate(range(len(ex)))
    assert (x[y == IGNORE].numel() > 0) and (y[:, -1] == IGNORE).any()  # prompts and padding present
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=256, vocab_size=story_tok.vocab_size)
    model = tiny(config=config)
    logits = model(x)[0].detach().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    loss.backward()
    kept = y != IGNORE
    assert (logits.grad[~kept] == 0).all()  # prompt and padding positions contribute nothing
    assert (logits.grad[kept].abs().sum(-1) > 0).all()
    by_hand = torch.stack([-logits[b, t].log_softmax(-1)[y[b, t]] for b, t in kept.nonzero()]).mean()
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(model(x, y)[1], by_hand)  # the model's own loss is the same
    # different padding tokens and different prompt targets change nothing
    x2 = x.clone()
    x2[~kept & (torch.arange(x.shape[1]) >= torch.tensor([len(i) for i in ex.inputs])[:, None])] = 7
    torch.testing.assert_close(model(x2, y)[1], by_hand)


def test_examples_errors(story_tok):
    clf = GPTClassifier(tiny(), ["happy", "sad"], pad_id=0)
    with pytest.raises(ValueError, match=re.escape("label 'angry' is not one of ['happy', 'sad']")):
        Examples.for_classification(CharTokenizer.train("abc"), ["ab", "c"], ["happy", "angry"], clf)
    with pytest.raises(ValueError, match="more than block_size=64"):
        Examples([[1] * 65], [0], pad_id=0, block_size=64)
    with pytest.raises(ValueError, match="no examples"):
        Examples([], [], pad_id=0)
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        Examples([[1, 2, 3]], [[1, 2]], pad_id=0)


# --- the classifier --------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_ignores_padding(pooling):
    clf = GPTClassifier(tiny(), ["a", "b", "c"], pad_id=0, pooling=pooling).eval()
    seqs = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    ex = Examples(seqs, [0, 1, 2], pad_id=0)
    x, _ = ex.collate(range(3))
    batched = clf(x)[0]
    for row, s in enumerate(seqs):
        alone = clf(torch.tensor([s]))[0][0]
        torch.testing.assert_close(batched[row], alone, atol=1e-6, rtol=0)
    feats = clf.body.features(torch.tensor([seqs[1]]))[0]
    expected = feats[-1] if pooling == "last" else feats.mean(0)
    torch.testing.assert_close(clf.head(expected), batched[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="padding .* must come after the text"):
        clf(torch.tensor([[0, 0, 3, 4]]))
    with pytest.raises(ValueError, match="targets must be 1 class indices in"):
        clf(torch.tensor([[3, 4]]), torch.tensor([3]))


def test_classifier_options():
    with pytest.raises(ValueError, match="pooling='max'"):
        GPTClassifier(tiny(), ["a", "b"], pad_id=0, pooling="max")
    with pytest.raises(ValueError, match="at least two distinct"):
        GPTClassifier(tiny(), ["a", "a"], pad_id=0)
    clf = GPTClassifier(tiny(), ["a", "b"], pad_id=0, freeze_body=True)
    assert trainable_parameters(clf) == 16 * 2 + 2


def test_trainer_finetunes_a_classifier_with_a_frozen_body():
    # A linear probe: only the head moves. The label is decided by the last token, one of 8, whose
    # 16-wide hidden states a linear head can separate (8 points in 16 dimensions always are).
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            + [int(torch.randint(1, 9, (1,), generator=g))] for _ in range(64)]
    labels = [int(s[-1] < 5) for s in seqs]
    clf = GPTClassifier(tiny(), ["low", "high"], pad_id=0, pooling="last", freeze_body=True)
    body = {n: p.clone() for n, p in clf.body.named_parameters()}
    data = Examples(seqs, labels, pad_id=0)
    cfg = TrainConfig(max_steps=200, batch_size=16, lr=3e-2, min_lr=3e-3, warmup_steps=5, eval_interval=200,
                      eval_batches=1, checkpoint_interval=0, progress=False, device="cpu", weight_decay=0)
    Trainer(clf, data, data, cfg).train()
    assert all(torch.equal(p, body[n]) for n, p in clf.body.named_parameters())
    assert classification_accuracy(clf, data) > 0.9


def test_trainer_needs_trainable_parameters():
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, torch.arange(100) % 50, torch.arange(100) % 50, TrainConfig(device="cpu"))


# --- generation and exact match -----------------------------------------------------------------------

def test_greedy_complete_equals_generate():
    model = tiny(3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(50, (n,), generator=g).tolist() for n in (5, 1, 17, 9, 30)]
    stop = 7
    got = greedy_complete(model, prompts, max_new_tokens=12, stop_id=stop, pad_id=0, batch_size=2)
    for p, answer in zip(prompts, got):
        ref = generate(model, p, 12, do_sample=False, stop_tokens=[stop])[0, len(p):].tolist()
        assert answer == (ref[:ref.index(stop)] if stop in ref else ref)
    with pytest.raises(ValueError, match="must fit in block_size=64"):
        greedy_complete(model, [[1] * 60], max_new_tokens=5, stop_id=stop)


def test_exact_match_scores_answers(story_tok):
    eos = story_tok.special_tokens[ENDOFTEXT]
    config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=256, vocab_size=story_tok.vocab_size)
    model = tiny(config=config)
    examples = [q for s in generate_stories(2, 9) for q in questions(s, ["place", "color"])]
    acc, answers = exact_match(model, story_tok, TEMPLATE, examples, eos, max_new_tokens=3)
    greedy = greedy_complete(model, [story_tok.encode(TEMPLATE.prompt(e)) for e in examples], 3, eos)
    assert answers == [story_tok.decode(a).strip() for a in greedy]
    assert acc == sum(a == e["response"] for a, e in zip(answers, examples)) / len(examples)


# --- the story tasks ----------------------------------------------------------------------------------

def test_questions_are_answered_by_the_story():
    for story in generate_stories(200, 3):
        qs = questions(story)
        assert [q["kind"] for q in qs] == list(QUESTIONS)
        for q in qs:
            assert re.search(rf"\b{q['response']}\b", story.text), (q, story.text)
        f = story.facts
        by = {q["kind"]: q for q in qs}
        assert by["giver"]["response"] == f.giver and by["gift"]["response"] == f.gift
        assert f.giver in (f.hero, f.friend) and f.receiver in (f.hero, f.friend) and f.giver != f.receiver
    with pytest.raises(ValueError, match="unknown question kind 'why'"):
        questions(generate_stories(1)[0], ["why"])


def test_lora_targets_exist_in_gpt():
    names = {n for n, _ in GPT(TINY).named_modules()}
    for t in LORA_TARGETS:
        assert any(n.endswith(t) for n in names)


def test_conversation_shares_the_story_and_learns_every_answer(story_tok):
    eos = story_tok.special_tokens[ENDOFTEXT]
    qs = questions(generate_stories(1, 4)[0])
    x, y = encode_conversation(story_tok, TEMPLATE, qs, eos, shared=("story",))
    text = story_tok.decode(x + [y[-1]])
    assert text.count(qs[0]["story"]) == 1  # the story once, then every question
    assert all(f"Q: {q['question']}\nA: {q['response']}<|endoftext|>" in text for q in qs)
    learned = [t for t in y if t != IGNORE]
    assert learned == [t for q in qs for t in story_tok.encode(" " + q["response"]) + [eos]]
    with pytest.raises(ValueError, match="at least one example"):
        encode_conversation(story_tok, TEMPLATE, [], eos)


def test_mean_loss_weights_every_target_once(story_tok):
    eos = story_tok.special_tokens[ENDOFTEXT]
    data = [q for s in generate_stories(3, 6) for q in questions(s, ["place", "gift"])]
    ex = Examples.for_instructions(story_tok, TEMPLATE, data, eos, pad_id=eos)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=256, vocab_size=story_tok.vocab_size)
    model = tiny(config=config)
    x, y = ex.collate(range(len(ex)))
    torch.testing.assert_close(mean_loss(model, ex, batch_size=2), model(x, y)[1].item())
