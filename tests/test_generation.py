"""Generation with early exit: modes none / sequence / token, CALM state propagation, sampling, batching."""

import numpy as np
import pytest
import torch
from tiny import make_converted

from adainfer.exit import ExitClassifier, ExitRule, Exits, Plan, gap_rule
from adainfer.generate import Sampling, generate
from adainfer.kv_cache import KVCache
from adainfer.loading import load_model
from adainfer.model import apply_rope, rope_cos_sin
from adainfer.traces import collect


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(4, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module", params=["llama-gqa-tied", "opt-350m-like"])
def deep(request, tmp_path_factory):
    folder = make_converted(request.param, tmp_path_factory.mktemp("gen"), seed=31, n_layers=6)[1]
    return load_model(folder, "float32")[0]


@pytest.fixture(scope="module")
def spread_rule(deep):
    """A gap rule whose threshold makes different prompts (and tokens) exit at different layers."""
    traces = collect(deep, prompts(16, 9), progress=False)
    return ExitRule(gap_rule(float(np.median(traces.features["gap"][:, :4]))))


NEVER = ExitRule(ExitClassifier("never", ["gap"], [0.0], -1.0))


def tokens_of(gens):
    return [g.token_ids for g in gens]


def test_mode_none_equals_dense(deep, spread_rule):
    batch = prompts(4, 1)
    dense = generate(deep, batch, 10)
    none = generate(deep, batch, 10, Plan(exit=spread_rule), mode="none")
    assert tokens_of(none) == tokens_of(dense)
    assert all(g.layers_run == [6] * 10 for g in none)


def test_sequence_mode(deep, spread_rule):
    batch = prompts(4, 2)
    dense = generate(deep, batch, 8)
    assert tokens_of(generate(deep, batch, 8, Plan(exit=NEVER), mode="sequence")) == tokens_of(dense)
    gens = generate(deep, batch, 8, Plan(exit=spread_rule), mode="sequence")
    for g, ids in zip(gens, batch):
        depth = g.layers_run[0]
        assert g.layers_run == [depth] * 8  # the depth chosen at prefill, for every token
        assert g.token_ids == generate(deep, [ids], 8, Plan(exit_at=depth))[0].token_ids  # = a depth-block model


def test_token_mode_with_never_firing_rule_equals_dense(deep):
    batch = prompts(3, 3)
    assert tokens_of(generate(deep, batch, 10, Plan(exit=NEVER), mode="token")) == tokens_of(generate(deep, batch, 10))


def test_token_mode_exits_per_token_and_batches_like_one_by_one(deep, spread_rule):
    batch = prompts(5, 4)
    together = generate(deep, batch, 8, Plan(exit=spread_rule), mode="token")
    depths = [d for g in together for d in g.layers_run]
    assert len(set(depths)) > 1
    for g, ids in zip(together, batch):
        alone = generate(deep, [ids], 8, Plan(exit=spread_rule), mode="token")[0]
        assert alone.token_ids == g.token_ids and alone.layers_run == g.layers_run


def test_token_mode_reads_its_decisions_every_n_checks(deep, spread_rule, monkeypatch):
    """plan.sync_every in token mode (one host read for N layers on a GPU): with a rule that never fires, dense; with
    one that fires, each token answers from the layer it fired at, as when every check is read: the same first token
    and exit layer (the prompt's), and each later token's depth one the rule can fire at. A batch equals its rows
    one by one."""
    batch = prompts(5, 4)
    dense = tokens_of(generate(deep, batch, 8))
    assert tokens_of(generate(deep, batch, 8, Plan(exit=NEVER, sync_every=4), mode="token")) == dense
    every = generate(deep, batch, 8, Plan(exit=spread_rule), mode="token")
    noted, note = [], Exits._note
    monkeypatch.setattr(Exits, "_note", lambda self, *a: noted.append(1) or note(self, *a))
    windows = generate(deep, batch, 8, Plan(exit=spread_rule, sync_every=4), mode="token")
    assert len(noted) > 8 * 4, "the decode steps kept their decisions on the device (windows of 4 checks)"
    assert [g.token_ids[0] for g in windows] == [g.token_ids[0] for g in every]
    assert [g.layers_run[0] for g in windows] == [g.layers_run[0] for g in every]
    assert len({d for g in windows for d in g.layers_run}) > 1
    for g, ids in zip(windows, batch):
        alone = generate(deep, [ids], 8, Plan(exit=spread_rule, sync_every=4), mode="token")[0]
        assert alone.token_ids == g.token_ids and alone.layers_run == g.layers_run


def test_state_propagation_fills_skipped_layers(deep):
    """After a token exits at layer k, the cache of layers > k at its position holds the K/V projections of its
    exit hidden state through those layers' norms (checked by hand)."""
    ids, k = prompts(1, 5)[0], 2
    L, pos = deep.config.n_layers, len(ids)
    cache = KVCache(deep.config, 1, pos + 1, deep.dtype)
    first = deep(torch.tensor([ids]), cache=cache)
    cache.length = pos
    fires_at_k = ExitRule(gap_rule(-1.0, first_layer=k))  # gap > -1 always: exits at its first check
    out = deep(first.token[:, None], cache=cache, plan=Plan(exit=fires_at_k, fill_skipped_kv=True))
    assert out.layers_run.tolist() == [k]
    # the exit hidden state of the new token, from an independent full forward over the sequence
    seq = torch.tensor([ids + [int(first.token)]])
    h_k = deep(seq, plan=Plan(hidden_states=True)).hidden_states[k][:, -1:]  # (1, 1, dim) after block k
    for j in range(k, L):
        block = deep.layers[j]
        x = block.attention_norm(h_k) if block.pre_norm else h_k
        a = block.attention
        w, bias = a.wqkv.weight, a.wqkv.bias
        kv = torch.nn.functional.linear(x, w[a.q_size:], None if bias is None else bias[a.q_size:])
        kk, vv = kv.split(a.kv_size, -1)
        kk = kk.view(1, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
        vv = vv.view(1, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if a.rotary:
            cos, sin = rope_cos_sin(deep.inv_freq, torch.tensor([[pos]]), deep.dtype)
            kk = apply_rope(kk, cos, sin)
        assert (cache.k[j][0, :, pos:pos + 1] - kk).abs().max() <= 1e-5, f"layer {j} keys"
        assert (cache.v[j][0, :, pos:pos + 1] - vv).abs().max() <= 1e-5, f"layer {j} values"
    # ... and the layers the token did run hold its real keys (not a propagated copy)
    assert sum(float(t[0, :, pos].abs().sum()) for t in cache.k[:k]) > 0


def test_seeded_sampling_is_reproducible(deep, spread_rule):
    batch = prompts(3, 6)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = generate(deep, batch, 12, Plan(exit=spread_rule), mode="token", sampling=s)
    b = generate(deep, batch, 12, Plan(exit=spread_rule), mode="token", sampling=s)
    c = generate(deep, batch, 12, Plan(exit=spread_rule), mode="token", sampling=Sampling(1.0, 50, 0.9, seed=8))
    assert tokens_of(a) == tokens_of(b) and tokens_of(a) != tokens_of(c)
    one = [generate(deep, [ids], 12, Plan(exit=spread_rule), mode="token", sampling=s, row_seeds=[7 + i])[0]
           for i, ids in enumerate(batch)]
    assert tokens_of(one) == tokens_of(a)  # per-row seeds: the same draws in a batch or alone


def test_sampling_filters():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    gens = [torch.Generator().manual_seed(0)]
    picks = {int(Sampling(1.0, top_k=2).pick(logits, gens)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(Sampling(1.0, top_p=0.5).pick(logits, gens)) for _ in range(50)}
    assert picks == {0}  # p(0) = 0.71 alone reaches top_p
    assert int(Sampling(0.0).pick(logits, gens)) == 0
