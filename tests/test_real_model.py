"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our conversion against transformers loading the same
file with gguf_file=. Tolerance: every hidden state and the final logits max abs diff <= 1e-3 in float32 (measured:
0.0 on each, with hidden states up to 2.4e4 in magnitude)."""

import pytest
import torch

from adainfer.exit import Plan
from adainfer.generate import generate
from adainfer.loading import load_model

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

PROMPTS = [
    "Q: the acting is superb and the story moving\nA:",
    "The capital of France is",
    "def fibonacci(n):\n    ",
]
PARAGRAPH = (
    "AdaInfer stops the layer loop early when a small classifier says the answer will not change. In 2024 the paper "
    "reported a 17.8% average pruning ratio (43% on sentiment), measured on Llama-2 7B/13B with V100 GPUs; "
    "here we check it on a 135M model. Does it hold? Let's see: naïve café résumé — 3.14, 1,000,000 and <tags>!"
)


@pytest.fixture(scope="module")
def ours(default_model_dir):
    return load_model(default_model_dir, "float32")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adainfer.default_model import default_gguf

    gguf = default_gguf(progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tok


def test_tokenizer_matches_transformers(ours, reference):
    _, tok = ours
    assert tok.encode(PARAGRAPH) == reference[1](PARAGRAPH).input_ids
    assert tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH
    # SmolLM2 splits numbers into single digits, as its tokenizer.json and llama.cpp do
    assert tok.encode(" 12345") == [216, 33, 34, 35, 36, 37]


def test_logits_match_transformers(ours, reference):
    model, tok = ours
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            want = reference[0](ids).logits[0, -1]
        diff = (model(ids).logits[0] - want).abs().max().item()
        assert diff <= 1e-3, f"{text!r}: max abs diff {diff}"


def test_every_hidden_state_matches_transformers(ours, reference):
    model, tok = ours
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            want = reference[0](ids, output_hidden_states=True).hidden_states
        got = model(ids, plan=Plan(hidden_states=True)).hidden_states
        assert len(got) == len(want) == 31  # the embeddings, then each block's output
        # transformers' last entry has the final norm applied
        got = list(got[:-1]) + [model.head_input(got[-1])]
        for i, (a, b) in enumerate(zip(got, want)):
            diff = (a - b).abs().max().item()
            assert diff <= 1e-3, f"{text!r}, hidden state {i}: max abs diff {diff}"


def test_greedy_continuations_match_transformers(ours, reference):
    model, tok = ours
    for text in PROMPTS:
        ids = tok.encode(text)
        mine = generate(model, [ids], max_new_tokens=20)[0].token_ids
        with torch.no_grad():
            theirs = reference[0].generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert mine == theirs, f"{text!r}: {tok.decode(mine)!r} vs {tok.decode(theirs)!r}"


def test_speculative_greedy_is_dense_greedy(ours):
    """The shipped draft's blocks (and a deeper one drafting 2 a round) on the real model: the dense tokens, batched
    and one by one, with some drafts kept."""
    from adainfer.speculative import Draft, load_draft, shipped_draft, speculative_generate

    model, tok = ours
    shipped = load_draft(shipped_draft(model.fingerprint), model)[0]
    rows = [tok.encode(p) for p in PROMPTS]
    dense = [g.token_ids for g in generate(model, rows, 16)]
    for draft in (shipped, Draft(list(range(0, 3)) + list(range(8, 30)), 2)):
        got = speculative_generate(model, rows, 16, draft)
        assert [g.token_ids for g in got] == dense
        assert [speculative_generate(model, [r], 16, draft)[0].token_ids for r in rows] == dense
        assert sum(n for g in got for n in g.accepted) > 0
