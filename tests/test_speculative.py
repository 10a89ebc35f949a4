"""Self-speculative greedy decoding (adainfer.speculative): the dense model's tokens whatever the draft, a batch equal
to its rows one by one, a cache holding exactly a dense run's keys and values, and the CLI."""

import json

import pytest
import torch
from helpers import run_cli
from test_exit import prompts
from tiny import make_converted

from adainfer.errors import AdainferError
from adainfer.generate import generate, left_pad
from adainfer.loading import load_model
from adainfer.model import KVCache
from adainfer.speculative import Draft, parse_layers, speculate, speculative_generate


@pytest.fixture(scope="module", params=["llama-gqa-tied", "opt-350m-like"])
def deep(request, tmp_path_factory):
    """A 6-block model, so that drafts can be shallow, deep or the whole model."""
    folder = make_converted(request.param, tmp_path_factory.mktemp("spec"), seed=31, n_layers=6)[1]
    return load_model(folder, "float32")[0], folder


# drafts that accept everything (the whole model), little (one block) and in between (a subset)
DRAFTS = {"all": None, "first-4": [0, 1, 2, 3], "skip-middle": [0, 1, 4, 5], "one": [0]}


@pytest.mark.parametrize("draft", list(DRAFTS))
@pytest.mark.parametrize("g", [1, 3])
def test_greedy_speculative_equals_dense(deep, draft, g):
    model, _ = deep
    batch = prompts(5, 3, lo=3, hi=30)
    dense = [x.token_ids for x in generate(model, batch, 20)]
    together = speculative_generate(model, batch, 20, Draft(DRAFTS[draft], g))  # left-padded, rows accept apart
    assert [r.token_ids for r in together] == dense
    for b, ids in enumerate(batch):
        alone = speculative_generate(model, [ids], 20, Draft(DRAFTS[draft], g))[0]
        assert alone.token_ids == dense[b] and alone.accepted == together[b].accepted
    accepted = [n for r in together for n in r.accepted]
    assert all(0 <= n <= g for n in accepted) and sum(len(r.token_ids) for r in together) == 5 * 20
    if draft == "all":  # the whole model drafts its own tokens: every draft accepted
        assert set(accepted) == {g}
    if draft != "all":
        assert min(accepted) < g  # some rounds reject


def test_the_cache_holds_a_dense_runs_keys_and_values(deep):
    """Rejected drafts leave holes; the slots that stay valid hold, in order, exactly a dense run's K/V."""
    model, _ = deep
    batch = prompts(3, 7, lo=3, hi=20)
    n = 15
    _, spec = speculate(model, batch, n, Draft([0, 1, 4, 5], 3))
    tokens, mask = left_pad(batch, 0)
    dense_tokens = [x.token_ids for x in generate(model, batch, n)]
    T = tokens.shape[1]
    cache = KVCache(model.config, len(batch), T + n, model.dtype)
    model(tokens, pad_mask=mask, cache=cache)
    cache.length = T
    for step in range(n - 1):
        model(torch.tensor([[d[step]] for d in dense_tokens]), cache=cache)
        cache.length += 1
    assert bool((~spec.valid[:, :spec.length]).sum(1).gt(T - torch.tensor([len(p) for p in batch])).any()), \
        "expected holes beyond the padding"
    for b in range(len(batch)):
        want = cache.valid[b, :cache.length].nonzero()[:, 0]
        got = spec.valid[b, :spec.length].nonzero()[:, 0][:len(want)]
        assert len(got) == len(want)
        for layer in range(model.config.n_layers):
            assert (spec.k[layer][b][:, got] - cache.k[layer][b][:, want]).abs().max() <= 1e-5
            assert (spec.v[layer][b][:, got] - cache.v[layer][b][:, want]).abs().max() <= 1e-5


def test_refusals(deep, converted):
    model, _ = deep
    with pytest.raises(AdainferError, match="--draft-length"):
        speculative_generate(model, [[5, 6]], 4, Draft([0], 0))
    for spec in ("0-9", "3,1", "a-b", ""):
        with pytest.raises(AdainferError, match="--draft-layers"):
            parse_layers(spec, 6)
    assert parse_layers("0,1,3-5", 6) == [0, 1, 3, 4, 5]
    windowed = load_model(converted("mistral-window")[1], "float32")[0]
    with pytest.raises(AdainferError, match="sliding-window"):
        speculative_generate(windowed, [[5, 6]], 4, Draft([0], 2))


@pytest.mark.slow
def test_run_cli_speculate(deep, tmp_path):
    _, folder = deep
    base = ("adainfer.run", "--model", folder, "--prompt", "hello there", "--max-new-tokens", "16", "--dtype",
            "float32", "--json")
    dense = json.loads(run_cli(*base, "--dense").stdout)
    r = run_cli(*base, "--speculate", "--draft-layers", "0,1,4,5", "--draft-length", "2")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["token_ids"] == dense["token_ids"] and got["tokens_per_verify"] >= 1 and got["accepted"]
    r = run_cli(*base[:-1], "--speculate")  # the default draft: the first two thirds; the human-readable report
    assert r.returncode == 0 and "tokens per verify" in r.stdout and "same answer" in r.stdout, r.stdout + r.stderr
    r = run_cli(*base, "--speculate", "--draft-min-prob", "0.5", "--temperature", "0")
    assert r.returncode == 0 and json.loads(r.stdout)["token_ids"] == dense["token_ids"], r.stderr
    r = run_cli(*base, "--speculate", "--draft-min-prob", "1.5")
    assert r.returncode == 2 and "--draft-min-prob: must be in [0, 1)" in r.stderr
    r = run_cli(*base, "--draft-layers", "0-3")
    assert r.returncode == 2 and "only apply with --speculate" in r.stderr


@pytest.mark.parametrize("half_vocab, min_prob", [(False, 0.0), (True, 0.0), (False, 0.4)])
def test_speculative_sampling_has_the_dense_distribution(deep, half_vocab, min_prob):
    """1500 rows of one prompt, each with its own seed, sampled speculatively (temperature 1, top-k 5, a 2-block draft
    of 2 tokens, its head all rows or every other one, or drafting only while it is sure): the counts of the 2nd and
    3rd tokens pass a chi-square test against the dense model's exact marginals (enumerated over the first tokens),
    and fail one against the draft's own (so the test can tell)."""
    from scipy.stats import chisquare

    from adainfer.exit import Plan
    from adainfer.generate import Sampling

    model, _ = deep
    prompt, n = [5, 17, 99, 3], 1500
    sampling = Sampling(temperature=1.0, top_k=5)
    vocab = torch.arange(0, 260, 2) if half_vocab else None
    gens = speculative_generate(model, [prompt] * n, 3, Draft([0, 1], 2, vocab=vocab, min_prob=min_prob),
                                sampling=sampling, row_seeds=list(range(n)))
    assert all(len(g.token_ids) == 3 for g in gens)

    def dist(seq, layers=None):  # the distribution a token after `seq` is drawn from
        return sampling.probs(model(torch.tensor([seq]), plan=Plan(layers=layers)).logits)[0]

    def marginal(layers=None):  # exact P(2nd token), P(3rd token): the first from the whole model, then `layers`
        second, third = torch.zeros(260), torch.zeros(260)
        p0 = dist(prompt)
        for x in p0.nonzero()[:, 0].tolist():
            p1 = dist(prompt + [x], layers)
            second += p0[x] * p1
            for y in p1.nonzero()[:, 0].tolist():
                third += p0[x] * p1[y] * dist(prompt + [x, y], layers)
        return second, third

    def pvalue(observed, expected):
        expected = expected * n
        big = expected >= 5  # categories too rare for the test are pooled
        obs = torch.cat([observed[big], observed[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        obs, exp = obs[exp > 0], exp[exp > 0]
        return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue

    counts = [torch.bincount(torch.tensor([g.token_ids[k] for g in gens]), minlength=260).double() for k in (1, 2)]
    dense, drafty = marginal(), marginal([0, 1])
    for k in range(2):
        assert pvalue(counts[k], dense[k].double()) > 1e-3
    if min_prob:  # some rounds stopped early
        assert any(n < 2 for g in gens for n in g.accepted)
    if not half_vocab and not min_prob:
        assert min(pvalue(counts[k], drafty[k].double()) for k in range(2)) < 1e-3


def test_a_draft_head_of_some_rows_changes_no_greedy_token(deep):
    """A draft reading a vocabulary subset (one that leaves out tokens the model writes), or stopping when unsure,
    still gives the dense tokens; its rows are gathered once (Decoder.head_rows), and a subset of frequent tokens is
    sorted ids."""
    from adainfer.speculative import frequent_tokens

    model, folder = deep
    rows = prompts(3, seed=5)
    dense = [g.token_ids for g in generate(model, rows, 12)]
    some = torch.arange(0, 260, 3)
    for draft in (Draft([0, 1, 4, 5], 2, vocab=some), Draft(None, 3, vocab=some), Draft([0, 5], 4, min_prob=0.05),
                  Draft([0, 1, 2], 3, min_prob=0.99)):
        assert [g.token_ids for g in speculative_generate(model, rows, 12, draft)] == dense
    assert model.head_rows(some) is model.head_rows(some.clone())  # the same gathered rows
    before = model.head_rows(some)
    head = model.output.weight if model.output is not None else model.tok_embeddings.weight
    saved = head.data
    head.data = saved * 2  # a swap of the head's storage (as quantize_model does) is seen
    try:
        torch.testing.assert_close(model.head_rows(some), before * 2)
    finally:
        head.data = saved
    torch.testing.assert_close(model.head_rows(some), before)
    from adainfer.loading import load_model as load

    tok = load(folder, "float32")[1]
    ids = frequent_tokens(tok, ["aab", "ab"], 2)
    assert ids.tolist() == sorted(ids.tolist()) and len(ids) == 2


@pytest.mark.parametrize("min_prob", [0.0, 0.5])
def test_speculative_sampling_rows_are_their_own(deep, min_prob):
    """A row's sampled tokens depend on its seed, not on its batch (nor on how long the other rows draft)."""
    from adainfer.generate import Sampling

    model, _ = deep
    rows = prompts(4, seed=7)
    sampling = Sampling(temperature=0.3, top_k=5)
    draft = Draft([0, 2], 3, min_prob=min_prob)
    together = speculative_generate(model, rows, 10, draft, sampling=sampling, row_seeds=[11, 12, 13, 14])
    alone = [speculative_generate(model, [r], 10, draft, sampling=sampling, row_seeds=[11 + i])[0]
             for i, r in enumerate(rows)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_calibrate_a_draft_and_run_with_it(deep, tmp_path):
    """calibrate --draft measures a draft and writes it bound to the model; run --speculate --draft FILE drafts with
    it when its calibration found it faster, runs dense (saying why) when not, and refuses another model's file."""
    model, folder = deep
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["hello there", "once upon a", "x y z"]))
    out = tmp_path / "draft.json"
    r = run_cli("adainfer.calibrate", "--draft", "--model", folder, "--prompts", prompts, "--draft-layers", "0,1,4,5",
                "--draft-length", "2", "--draft-vocab", "40", "--draft-tokens", "8", "--dtype", "float32",
                "--out", out)
    assert r.returncode == 0, r.stderr
    assert "predicted speed" in r.stdout
    data = json.loads(out.read_text())
    report = data["report"]
    assert data["model"]["fingerprint"] == model.fingerprint and data["layers"] == [0, 1, 4, 5]
    assert len(data["vocab"]) <= 40 and report["tokens_per_verify"] >= 1 and report["verify_ms"] > 0
    assert report["pays"] == (report["predicted_speed_vs_dense"] > 1)

    base = ("adainfer.run", "--model", folder, "--prompt", "hello there", "--max-new-tokens", "12", "--dtype",
            "float32", "--json")
    dense = json.loads(run_cli(*base, "--dense").stdout)["token_ids"]
    for pays in (True, False):
        data["report"]["pays"] = pays
        out.write_text(json.dumps(data))
        r = run_cli(*base, "--speculate", "--draft", out)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["token_ids"] == dense
        assert ("accepted" in got) == pays and ("running dense" in r.stderr) == (not pays)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**data, "model": {"fingerprint": "0" * 16}}))
    r = run_cli(*base, "--speculate", "--draft", other)
    assert r.returncode == 2 and "calibrated for another model" in r.stderr
    other.write_text("{")
    r = run_cli(*base, "--speculate", "--draft", other)
    assert r.returncode == 2 and "malformed draft JSON" in r.stderr
    r = run_cli(*base, "--speculate", "--draft", out, "--draft-layers", "0-2")
    assert r.returncode == 2 and "not both" in r.stderr
