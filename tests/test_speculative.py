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
    r = run_cli(*base, "--draft-layers", "0-3")
    assert r.returncode == 2 and "only apply with --speculate" in r.stderr
