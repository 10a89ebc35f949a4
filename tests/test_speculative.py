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
from adainfer.kv_cache import KVCache
from adainfer.loading import load_model
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
    from adainfer.draft_search import Positions

    with pytest.raises(AdainferError, match="sliding-window"):  # the search refuses it before running anything
        Positions(windowed, [([5, 6, 7, 8], 2)])


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
    r = run_cli(*base, "--speculate", "--draft-head", "int8", "--device", "cuda")  # before anything loads
    assert r.returncode == 2 and "--draft-head: int8 drafts run in the CPU's int8 kernels" in r.stderr


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
    report = data["reports"]["eager"]
    assert data["model"]["fingerprint"] == model.fingerprint and data["layers"] == [0, 1, 4, 5]
    assert len(data["vocab"]) <= 40 and report["tokens_per_verify"] >= 1 and report["verify_ms"] > 0
    assert report["pays"] == (report["predicted_speed_vs_dense"] >= 1.05)

    base = ("adainfer.run", "--model", folder, "--prompt", "hello there", "--max-new-tokens", "12", "--dtype",
            "float32", "--json")
    dense = json.loads(run_cli(*base, "--dense").stdout)["token_ids"]
    for pays in (True, False):
        data["reports"]["eager"]["pays"] = pays
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
    from adainfer.speculative import load_draft

    old = {k: v for k, v in data.items() if k not in ("reports", "head", "search")}
    other.write_text(json.dumps({**old, "version": 1, "report": data["reports"]["eager"]}))
    draft, reports = load_draft(other, model)  # a version-1 file: its one report was measured eagerly
    assert list(reports) == ["eager"] and draft.head == "full" and draft.layers == [0, 1, 4, 5]
    other.write_text(json.dumps({**data, "head": "int4"}))
    with pytest.raises(AdainferError, match="bad layers, length, min_prob, head"):
        load_draft(other, model)


@pytest.mark.parametrize("capture", [False, True])
def test_speculation_through_decode_graph_steps_equals_dense_through_them(deep, capture):
    """Draft and verify steps through a DecodeGraph's step function (run eagerly; capture=True: the captured path's
    static buffers and pooled cache, without the CUDA graph): the tokens of dense decoding through the same graph,
    for drafts of a block subset, of head rows, of the int8 head, and adaptive ones; batched and one by one."""
    from adainfer.fast_decode import DecodeGraph

    model, _ = deep
    graph = DecodeGraph(model, "compiled", compile=False, capture=capture)
    batch = prompts(4, 9, lo=3, hi=25)
    dense = [x.token_ids for x in generate(model, batch, 16, graph=graph)]
    some = torch.arange(0, model.config.vocab_size, 2)
    for draft in (Draft([0, 1, 4, 5], 3), Draft([0, 5], 2, vocab=some, head="int8"), Draft(None, 2, head="int8"),
                  Draft([0, 1, 2], 3, min_prob=0.3)):
        got = speculative_generate(model, batch, 16, draft, graph=graph)
        assert [r.token_ids for r in got] == dense
        assert speculative_generate(model, batch[:1], 16, draft, graph=graph)[0].token_ids == dense[0]
        # 3 rows: with capture, the first rows of the 4-row bucket; its spare row sees only each step's new slots
        # (rejected drafts' slots left valid would carry its position past the table: an OPT model's IndexError)
        assert [r.token_ids for r in speculative_generate(model, batch[:3], 16, draft, graph=graph)] == dense[:3]
        if capture:
            assert int(graph.pool[4].valid[3].sum()) <= draft.length + 1
    whole = speculative_generate(model, batch, 16, Draft(None, 2), graph=graph)
    assert {n for r in whole for n in r.accepted} == {2}  # the whole model drafting through the graph: all kept


def test_int4_speculation_is_dense_int4_at_batch_one(tmp_path):
    """On int4 weights (the kernels round activations, so a last-bit difference can change a token), batch 1 keeps
    the dense run's cache layout (a rejected draft's slots are rewritten, not left as holes): the very tokens of
    dense int4 decoding, its verify logits bit for bit those of one-token steps."""
    from adainfer.fast_decode import DecodeGraph, quantize_model

    model = load_model(make_converted("llama-gqa-tied", tmp_path, seed=41, n_layers=6)[1], "float32")[0]
    quantize_model(model)
    graph = DecodeGraph(model, "int4", compile=False)
    for ids in prompts(4, 13, lo=3, hi=30):
        dense = generate(model, [ids], 20, graph=graph)[0].token_ids
        for draft in (Draft([0, 1, 4, 5], 3), Draft([0, 2], 2, vocab=torch.arange(0, 200))):
            assert speculative_generate(model, [ids], 20, draft, graph=graph)[0].token_ids == dense
    ids = torch.tensor([prompts(1, 3, lo=8, hi=9)[0]])
    steps, many = [], None
    for one_by_one in (True, False):
        cache = KVCache(model.config, 1, 16, model.dtype)
        model(ids[:, :5], cache=cache)
        cache.length = 5
        if one_by_one:
            for t in range(5, 8):
                steps.append(graph(ids[:, t:t + 1], cache))
                cache.length += 1
        else:
            many = graph(ids[:, 5:8], cache)
    assert torch.equal(torch.stack(steps, 1), many)


def test_first_draft_acceptance_and_the_block_search(deep):
    """draft_search.Positions scores a draft's first step after a verified context for every position at once: the
    same predictions as a cache built by the whole model up to the position and one draft step. The search removes
    one block a step from the whole model (acceptance 1) and picks the draft its cost model predicts fastest."""
    from adainfer.draft_search import Positions, best_draft, choose_head, cost_model, predict, search_blocks
    from adainfer.speculative import Steps

    model, _ = deep
    rows = prompts(3, 17, lo=4, hi=20)
    seqs = [(ids + g.token_ids[:-1], 9) for ids, g in zip(rows, generate(model, rows, 10))]
    where = Positions(model, seqs)
    some = torch.arange(0, model.config.vocab_size, 3)
    for draft in (Draft([0, 1, 4, 5], 1), Draft([0, 3], 1, vocab=some), Draft([1, 2, 5], 1, head="int8")):
        hits = total = 0
        for ids, n in seqs:
            for t in range(len(ids) - n - 1, len(ids) - 1):
                cache = KVCache(model.config, 1, t + 1, model.dtype)
                model(torch.tensor([ids[:t]]), cache=cache)  # the whole model's cache before position t
                cache.length = t
                logits = Steps(model, draft, cache).draft(torch.tensor([ids[t]]))
                guess = int(logits.argmax(-1)) if draft.vocab is None else int(draft.vocab[logits.argmax(-1)])
                hits += guess == ids[t + 1]
                total += 1
        assert where.acceptance(draft) == pytest.approx(hits / total)
    assert where.acceptance(Draft(None, 1)) == 1.0
    path = search_blocks(where, Draft(None, 2), min_blocks=2)
    assert [len(b) for b, _ in path] == [6, 5, 4, 3, 2] and path[0][1] == 1.0
    assert all(set(b2) < set(b1) for (b1, _), (b2, _) in zip(path, path[1:]))
    costs = cost_model(model, seqs[0][0], Draft(None, 2), 2, repeats=2)
    assert set(costs["verify_ms"]) == {1, 2} and costs["dense_step_ms"] > 0 and costs["draft_block_ms"] >= 0
    blocks, g, tau, speed = best_draft(path, costs)
    assert (tau, speed) == predict(dict((tuple(b), a) for b, a in path)[tuple(blocks)], g, len(blocks), costs)
    assert speed == max(predict(a, k, len(b), costs)[1] for b, a in path for k in (1, 2))
    assert predict(1.0, 2, 6, costs)[0] == 3 and predict(0.0, 2, 6, costs)[0] == 1
    head, speeds = choose_head(where, seqs[0][0], Draft(blocks, g), ["full", "int8"], repeats=2)
    assert set(speeds) == {"full", "int8"} and speeds[head] == max(speeds.values())


def test_calibrate_searches_the_blocks_and_run_speculates_on_int4_graphs(tmp_path):
    """calibrate --draft without --draft-layers searches them and records the search; each --draft-decode mode gets
    its report, and run --speculate --decode MODE reads that mode's verdict (or says the mode was not measured).
    run --speculate --decode int4 (compiled draft and verify graphs on int4 weights) answers as dense int4 does."""
    folder = make_converted("llama-gqa-tied", tmp_path, seed=31, n_layers=6)[1]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["hello there", "once upon a", "x y z"]))
    out = tmp_path / "draft.json"
    r = run_cli("adainfer.calibrate", "--draft", "--model", folder, "--prompts", prompts, "--draft-length", "2",
                "--draft-head", "int8", "--draft-tokens", "8", "--dtype", "float32", "--out", out)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    search = data["search"]
    assert [len(step["blocks"]) for step in search["path"]] == [6, 5, 4, 3, 2] and data["head"] == "int8"
    assert search["heads"] == {}  # the head was given: not searched
    assert data["layers"] in [step["blocks"] for step in search["path"]] and 1 <= data["length"] <= 2
    assert list(data["reports"]) == ["eager"] and "first-draft acceptance" in r.stdout

    base = ("adainfer.run", "--model", folder, "--prompt", "hello there", "--max-new-tokens", "10", "--dtype",
            "float32", "--json", "--decode", "int4")
    r = run_cli(*base, "--speculate", "--draft", out)
    assert r.returncode == 0, r.stderr
    assert "measured with --decode eager, not int4: running it unmeasured" in r.stderr
    dense = json.loads(run_cli(*base, "--dense").stdout)["token_ids"]
    got = json.loads(r.stdout)
    assert got["token_ids"] == dense and "accepted" in got
