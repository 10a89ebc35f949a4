"""Translators (adainfer.translator): the ridge fit against its closed form, an identity translator changes nothing
in the loop, the translated loop's features and answers equal a plain-torch recomputation, translator files are
bound to their model, and the CLIs with --translator as a user runs them."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_translator, run_cli
from test_calibrate_cli import _prompts_file
from test_exit import prompts

from adainfer.errors import AdainferError
from adainfer.exit import ExitClassifier, ExitRule, Plan, gap_rule, never_rule
from adainfer.generate import generate, left_pad
from adainfer.loading import load_model
from adainfer.traces import collect, fit_translator_on, oracle_layers, simulate, translated
from adainfer.translator import Translator, cv_penalty, fit_layer, identity, parse_kind, ridge


def test_ridge_equals_the_closed_form():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12))
    R = rng.normal(size=(300, 12))
    Xc = X - X.mean(0)
    for lam in (0.0, 0.5, 40.0):
        want = np.linalg.solve(Xc.T @ Xc + lam * np.eye(12), Xc.T @ R)
        assert np.abs(ridge(Xc, R, lam) - want).max() < 1e-9


def test_affine_fit_recovers_a_known_map_and_cv_prefers_less_penalty_on_clean_data():
    rng = np.random.default_rng(1)
    d = 10
    A = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    b = rng.normal(size=d)
    X = rng.normal(size=(2000, d)) * 3
    Y = X @ A + b + 1e-3 * rng.normal(size=(2000, d))
    m, info = fit_layer(X, Y, "affine", None)
    got = X @ (np.eye(d) + m["d"].double().numpy()) + m["b"].double().numpy()
    assert np.abs(got - Y).max() < 0.05
    lam, errors = cv_penalty(X, Y - X)
    assert lam > 0 and errors[0] <= errors[-1]  # clean data: the smallest penalty predicts best
    assert info["cv_error"] < info["identity_error"]


def test_lowrank_fit_is_identity_plus_rank_r_and_recovers_a_low_rank_correction():
    rng = np.random.default_rng(2)
    d, r = 16, 2
    D = rng.normal(size=(d, r)) @ rng.normal(size=(r, d)) * 0.3
    X = rng.normal(size=(3000, d))
    Y = X + X @ D + 0.5 + 1e-3 * rng.normal(size=(3000, d))
    m, _ = fit_layer(X, Y, "lowrank", r)
    assert m["v"].shape == (d, r) and m["u"].shape == (r, d)
    got = X + (X @ m["v"].double().numpy()) @ m["u"].double().numpy() + m["b"].double().numpy()
    assert np.abs(got - Y).max() < 0.05


def test_parse_kind():
    assert parse_kind("affine") == ("affine", None) and parse_kind("lowrank:8") == ("lowrank", 8)
    assert parse_kind("none") == (None, None) and parse_kind(None) == (None, None)
    for bad in ("lowrank:0", "lowrank", "lowrank:x", "linear"):
        with pytest.raises(AdainferError, match="--translator"):
            parse_kind(bad)


def test_identity_translator_is_bit_identical_to_none(deep):
    batch = prompts(8, 3)
    traces = collect(deep, batch, progress=False)
    threshold = float(np.median(traces.features["gap"][:, :3]))  # rows exit at different layers
    tokens, mask = left_pad(batch, 0)
    L = deep.config.n_layers
    for kind in ("affine", "lowrank"):
        for clf in (gap_rule(threshold), never_rule()):
            plain = deep(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(clf), record_features=True))
            clf.translator = identity(deep.config.dim, range(1, L), kind)
            read = deep(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(clf), record_features=True))
            clf.translator = None
            assert torch.equal(plain.logits, read.logits) and torch.equal(plain.layers_run, read.layers_run)
            for a, b in zip(plain.features, read.features):
                assert torch.equal(a["gap"], b["gap"]) and torch.equal(a["top1"], b["top1"])
            if clf.kind == "gap":  # the comparison covers rows that exit at different layers
                assert len(set(plain.layers_run.tolist())) > 1
    # generation too (sequence and token modes)
    clf = gap_rule(threshold)
    base = generate(deep, batch[:3], 5, Plan(exit=ExitRule(clf)))
    clf.translator = identity(deep.config.dim, range(1, L))
    for mode in ("sequence", "token"):
        a = generate(deep, batch[:3], 5, Plan(exit=ExitRule(gap_rule(threshold))), mode=mode)
        b = generate(deep, batch[:3], 5, Plan(exit=ExitRule(clf)), mode=mode)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.layers_run for g in a] == [g.layers_run for g in b]
    assert [g.token_ids for g in base] == [g.token_ids for g in generate(deep, batch[:3], 5, Plan(
        exit=ExitRule(gap_rule(threshold))))]


def reference_reading(model, h, translator, n):
    """Plain torch: T_n(h) -> final RMSNorm -> tied head, float32 logits."""
    m = translator.maps[n]
    x = h + (h @ m["d"] if "d" in m else (h @ m["v"]) @ m["u"]) + m["b"]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.norm_eps) * model.norm.weight
    return x @ model.head_weight.T


@pytest.mark.parametrize("kind", ["affine", "lowrank"])
def test_translated_features_and_answers_equal_a_plain_recomputation(deep, kind):
    L, dim = deep.config.n_layers, deep.config.dim
    reader = random_translator(dim, range(1, L), kind=kind)
    batch = prompts(6, 7)
    tokens, mask = left_pad(batch, 0)
    hs = deep(tokens, pad_mask=mask, plan=Plan(hidden_states=True)).hidden_states
    clf = ExitClassifier("never", ["gap", "top_prob"], [0.0, 0.0], -1.0)
    clf.translator = reader
    out = deep(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(clf), record_features=True))
    for rec in out.features:
        n = rec["layer"]
        p = F.softmax(reference_reading(deep, hs[n][:, -1], reader, n), -1).topk(2, -1).values
        assert (rec["gap"] - (p[:, 0] - p[:, 1])).abs().max() < 1e-5
        assert (rec["top_prob"] - p[:, 0]).abs().max() < 1e-5
    # the traces read through the translator (what calibration fits on) equal the loop's features
    traces = translated(collect(deep, batch, progress=False, hidden=0), deep, reader)
    for rec in out.features:
        n = rec["layer"]
        assert np.abs(traces.features["gap"][:, n - 1] - rec["gap"].numpy()).max() < 1e-5
    # a row that exits answers with its translated reading, and forcing the exit there gives the same answer
    threshold = float(np.median(traces.features["gap"][:, :3]))
    clf = gap_rule(threshold)
    clf.translator = reader
    rule = ExitRule(clf)
    got = deep(tokens, pad_mask=mask, plan=Plan(exit=rule))
    assert got.layers_run.tolist() == simulate(rule, traces).tolist()
    for b, n in enumerate(got.layers_run.tolist()):
        want = reference_reading(deep, hs[n][b, -1], reader, n) if n < L else deep.logits(hs[n][b, -1])
        assert (got.logits[b] - want).abs().max() < 1e-4
        forced = deep(torch.tensor([batch[b]]), plan=Plan(exit_at=n, translator=reader))
        assert (forced.logits[0] - got.logits[b]).abs().max() < 1e-4
    assert len(set(got.layers_run.tolist())) > 1


def test_fit_on_traces_beats_the_plain_reading(deep):
    """A translator fitted on a model's own states reads its middle layers closer to the last one."""
    ids = prompts(40, 11, lo=8, hi=30)
    traces = collect(deep, ids, progress=False, hidden=8)
    assert traces.hidden.shape == (40, deep.config.n_layers, deep.config.dim) and len(traces.samples) > 40 * 4
    hs = deep(torch.tensor([ids[0]]), plan=Plan(hidden_states=True)).hidden_states
    for n in (1, deep.config.n_layers):
        assert np.abs(traces.hidden[0, n - 1] - hs[n][0, -1].numpy()).max() < 1e-5  # batched vs alone
    reader = fit_translator_on(traces.select(np.arange(30)), "affine")
    assert reader.layers == list(range(1, deep.config.n_layers))
    held = traces.select(np.arange(30, 40))
    plain = (held.top1[:, :-1] == held.top1[:, -1:]).mean()
    read = translated(held, deep, reader)
    assert (read.top1[:, :-1] == read.top1[:, -1:]).mean() > plain
    assert oracle_layers(read).mean() <= oracle_layers(held).mean()


def test_collected_states_do_not_hold_their_batch(deep, monkeypatch):
    """Each batch's last-token states are copied out of the batch's (B, L, T, dim) states: a view would keep them all
    alive until the batches are assembled (a 1000-prompt AG News collection grew past 24 GB that way)."""
    from adainfer.distributed import World

    parts = []
    real = World.map_batches
    monkeypatch.setattr(World, "map_batches", lambda self, *a: parts.extend(real(self, *a)) or parts)
    collect(deep, prompts(6, 12, lo=8, hi=30), progress=False, hidden=2, batch_size=3)
    assert len(parts) == 2
    for got in parts:
        for a in (got["states"], *got["samples"]):
            assert a.base is None or a.base.untyped_storage().nbytes() == a.nbytes


def test_translator_files_round_trip_and_are_bound_to_their_model(deep, converted, tmp_path):
    L = deep.config.n_layers
    clf = gap_rule(0.5, first_layer=2)
    clf.model = {"fingerprint": deep.fingerprint, "name": "deep", "n_layers": L}
    clf.translator = random_translator(deep.config.dim, range(2, L))
    clf.translator.model = dict(clf.model)
    clf.save(tmp_path / "c.json")
    side = tmp_path / "c.translator.safetensors"
    assert side.is_file() and json.loads((tmp_path / "c.json").read_text())["translator"]["file"] == side.name
    back = ExitClassifier.load(tmp_path / "c.json")
    back.check_model(deep, "c.json")
    for n in range(2, L):
        for k, t in clf.translator.maps[n].items():
            assert torch.equal(back.translator.maps[n][k], t)
    # another model (another fingerprint) is refused, by the classifier and by the translator alone
    other = load_model(converted("llama-mha")[1], "float32")[0]
    with pytest.raises(AdainferError, match="fitted for model"):
        back.check_model(other, "c.json")
    with pytest.raises(AdainferError, match="translator was fitted for model"):
        back.translator.check_model(other, "t")
    # a translator that misses a checked layer, a changed or missing translator file, a foreign file
    short = gap_rule(0.5, first_layer=2)
    short.translator = random_translator(deep.config.dim, range(3, L))
    with pytest.raises(AdainferError, match=r"no map for the checked layers \[2\]"):
        short.check_model(deep, "short")
    random_translator(deep.config.dim, range(2, L), seed=5).save(side)
    with pytest.raises(AdainferError, match="sha256 differs"):
        ExitClassifier.load(tmp_path / "c.json")
    side.unlink()
    with pytest.raises(AdainferError, match="translator .* is missing"):
        ExitClassifier.load(tmp_path / "c.json")
    side.write_bytes(b"not safetensors")
    with pytest.raises(AdainferError, match="unreadable translator"):
        Translator.load(side)


@pytest.mark.slow
def test_clis_with_a_translator(tiny_model, tmp_path):
    """calibrate --translator (affine and low rank), then run --exit and eval svm+translator / translated-oracle."""
    rows = tmp_path / "task.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"item {i}: {'yes' if i % 2 else 'no'} is", "answer": "x"}) + "\n"
                            for i in range(30)))
    for spec in ("affine", "lowrank:4"):
        out = tmp_path / f"clf_{spec.replace(':', '')}.json"
        proc = run_cli("adainfer.calibrate", "--model", tiny_model, "--dtype", "float32", "--task-file", rows,
                       "--limit", "10", "--shots", "1", "--translator", spec, "--translator-positions", "4",
                       "--check-cost", "0", "--out", out)
        assert proc.returncode == 0, proc.stderr
        side = out.with_name(out.stem + ".translator.safetensors")
        assert side.is_file() and f"and {side}" in proc.stdout and "translator:" in proc.stdout
        clf = ExitClassifier.load(out)
        assert clf.translator.kind == spec.split(":")[0] and clf.calibration["translator"]["kind"] == spec
        assert clf.translator.layers == list(range(clf.first_layer, 3))  # the tiny model has 3 blocks
        assert "heldout_without_translator" in clf.calibration
    proc = run_cli("adainfer.run", "--model", tiny_model, "--dtype", "float32", "--exit", out, "--prompt", "item 3",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    res = run_cli("adainfer.eval", "--model", tiny_model, "--dtype", "float32", "--task-file", rows, "--shots", "1",
                  "--limit", "6", "--method", "dense", f"svm+translator:{out}", "oracle", "translated-oracle",
                  "--out", tmp_path / "ev" / "r.json")
    assert res.returncode == 0, res.stderr
    got = json.loads((tmp_path / "ev" / "r.json").read_text())
    run = got["runs"][0]
    assert set(run["methods"]) == {"dense", f"svm+translator:{out}", "oracle", "translated-oracle"}
    assert "per_layer_translated" in run and "translator" in run["methods"]["translated-oracle"]["info"]
    # refused before any model work: a bad kind; a classifier without a translator for svm+translator
    bad = run_cli("adainfer.calibrate", "--model", tiny_model, "--task-file", rows, "--translator", "lowrank:0",
                  "--out", tmp_path / "x.json")
    assert bad.returncode == 2 and "--translator" in bad.stderr and not (tmp_path / "x.json").exists()
    plain = tmp_path / "plain.json"
    assert run_cli("adainfer.calibrate", "--model", tiny_model, "--prompts", _prompts_file(tmp_path),
                   "--first-layer", "1", "--out", plain).returncode == 0
    bad = run_cli("adainfer.eval", "--model", tiny_model, "--task-file", rows, "--limit", "4",
                  "--method", f"svm+translator:{plain}", "--out", tmp_path / "bad" / "r.json")
    assert bad.returncode == 2 and "without a translator" in bad.stderr and not (tmp_path / "bad" / "r.json").exists()


def test_tuning_weighs_blocks_against_checks(deep):
    """calibration.tune minimises blocks run + check_cost x checks made among the classifiers that keep the target
    agreement; measure_check_cost gives a positive ratio."""
    from adainfer.calibration import FitOptions, measure_check_cost, tune
    from adainfer.traces import final_labels

    ids = prompts(40, 13, lo=8, hi=30)
    traces = collect(deep, ids, progress=False)
    L = deep.config.n_layers
    stats = {}
    for cost in (0.0, 50.0):
        clf, t = tune(FitOptions(target_agreement=0.9, check_cost=cost), traces, final_labels(traces), L, quiet=True)
        exits = simulate(ExitRule(clf), traces)
        checks = np.clip(np.minimum(exits, L - 1) - clf.first_layer + 1, 0, None)
        assert t["train_avg_checks"] == pytest.approx(checks.mean())
        assert t["train_cost_blocks"] == pytest.approx(exits.mean() + cost * checks.mean())
        stats[cost] = t
    assert stats[50.0]["train_avg_checks"] <= stats[0.0]["train_avg_checks"]
    assert stats[0.0]["train_avg_layers"] <= stats[50.0]["train_avg_layers"]
    assert measure_check_cost(deep, ids[:5], repeats=2) > 0
    assert measure_check_cost(deep, ids[:5], translated_layer=2, repeats=2) > 0


def test_translator_composes_with_candidates_and_the_int8_check_head(deep):
    from adainfer.fast_decode import prepare_check_head

    L, dim = deep.config.n_layers, deep.config.dim
    reader = random_translator(dim, range(1, L), seed=3)
    batch = prompts(6, 9)
    tokens, mask = left_pad(batch, 0)
    hs = deep(tokens, pad_mask=mask, plan=Plan(hidden_states=True)).hidden_states
    # candidate mode: the features are the softmax over the candidates' logits of the translated reading
    cands = torch.tensor([65, 66, 67, 97])
    clf = ExitClassifier("never", ["gap", "top_prob"], [0.0, 0.0], -1.0)
    clf.translator = reader
    out = deep(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(clf), candidates=cands, record_features=True))
    for rec in out.features:
        p = F.softmax(reference_reading(deep, hs[rec["layer"]][:, -1], reader, rec["layer"])[:, cands], -1)
        assert (rec["top_prob"] - p.max(-1).values).abs().max() < 1e-5
    # int8 check head: the decisions from int8 features, the answers from the full-precision translated reading
    prepare_check_head(deep, "int8", None, "test")
    traces = translated(collect(deep, batch, progress=False, hidden=0), deep, reader)
    clf = gap_rule(float(np.median(traces.features["gap"][:, :2])))
    clf.translator = reader
    got = deep(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(clf), check_head="int8"))
    for b, n in enumerate(got.layers_run.tolist()):
        want = reference_reading(deep, hs[n][b, -1], reader, n) if n < L else deep.logits(hs[n][b, -1])
        assert (got.logits[b] - want).abs().max() < 1e-4
