"""KV-cache decoding equals a full forward; a left-padded batch equals the prompts run one by one."""

import pytest
import torch

from adainfer.generate import generate, left_pad
from adainfer.kv_cache import KVCache
from adainfer.loading import load_model

PRESETS = ["llama-mha", "llama-gqa-tied", "opt-125m-like", "opt-350m-like", "qwen2-window", "qwen3-head-dim",
           "mistral-window", "gemma3-local"]


def prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_decoding_equals_full_forward(converted, preset):
    model, _ = load_model(converted(preset)[1], "float32")
    ids = prompts(1)[0]
    steps = 6
    cache = KVCache(model.config, 1, len(ids) + steps, model.dtype)
    out = model(torch.tensor([ids]), cache=cache)
    cache.length = len(ids)
    seq = list(ids)
    for _ in range(steps):
        full = model(torch.tensor([seq]))  # no cache: the whole sequence again
        assert torch.equal(full.token, out.token)
        assert (full.logits - out.logits).abs().max() <= 1e-5
        seq.append(int(out.token))
        out = model(out.token[:, None], cache=cache)
        cache.length += 1


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_equals_one_by_one(converted, preset):
    model, _ = load_model(converted(preset)[1], "float32")
    batch = prompts(5, seed=1)
    tokens, mask = left_pad(batch, 0)
    assert mask is not None and not bool(mask.all())
    together = model(tokens, pad_mask=mask)
    for b, ids in enumerate(batch):
        alone = model(torch.tensor([ids]))
        assert torch.equal(alone.token[0], together.token[b])
        assert (alone.logits[0] - together.logits[b]).abs().max() <= 1e-5


@pytest.mark.parametrize("preset", ["llama-gqa-tied", "opt-350m-like"])
def test_batched_generation_equals_one_by_one(converted, preset):
    model, _ = load_model(converted(preset)[1], "float32")
    batch = prompts(4, seed=2)
    together = generate(model, batch, max_new_tokens=8)
    for b, ids in enumerate(batch):
        alone = generate(model, [ids], max_new_tokens=8)[0]
        assert alone.token_ids == together[b].token_ids
        assert together[b].layers_run == [model.config.n_layers] * 8


def test_generation_stops_at_eos(converted):
    model, _ = load_model(converted("llama-mha")[1], "float32")
    ids = prompts(1, seed=3)[0]
    free = generate(model, [ids], max_new_tokens=6)[0].token_ids
    stopped = generate(model, [ids], max_new_tokens=6, eos_id=free[2])[0].token_ids
    assert stopped == free[:free.index(free[2]) + 1]


@pytest.mark.parametrize("every", [1, 3, 8])
def test_eos_looked_for_every_few_steps_ends_each_row_at_its_own(converted, monkeypatch, every):
    """On a GPU generation reads EOS back every few steps (the tokens stay on the device between): a batch may run
    past a row's EOS, but each row still ends at its first EOS, with the blocks run for just those tokens."""
    import adainfer.generate as gen

    model, _ = load_model(converted("llama-mha")[1], "float32")
    batch = prompts(3, seed=4)
    free = generate(model, batch, max_new_tokens=10)
    eos = free[0].token_ids[4]  # row 0 ends at step 4 (or before); the others where (or if) they meet it
    monkeypatch.setattr(gen, "eos_check_every", lambda device: every)
    got = generate(model, batch, max_new_tokens=10, eos_id=eos)
    for b in range(3):
        want = free[b].token_ids
        n = want.index(eos) + 1 if eos in want else len(want)
        assert got[b].token_ids == want[:n]
        assert got[b].layers_run == free[b].layers_run[:n]
