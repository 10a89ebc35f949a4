"""Qwen2, Qwen3, Mistral and Gemma 3 next to Llama (issue 17), each through the real converter from a random-init
transformers model with its distinctive pieces on (tiny.PRESETS: windows shorter than the prompts, Qwen3's
head_dim != dim / heads, Gemma 3's local and global layers, sandwich norms, soft-capping). Hidden-state and logit
parity is in test_parity.py (all presets), cached decoding and padded batches in test_cache_batch.py, the decode
graph in test_fast_decode.py. Here: greedy generation against transformers, GGUF files of each family, exits on
each family, and `adainfer.run` on shapes the other tests do not use.

Tolerances: float32 logits within 1e-4 of transformers; greedy tokens equal."""

import json

import numpy as np
import pytest
import torch
from helpers import random_translator, run_cli
from test_gguf import HF_TO_GGUF as LLAMA_TO_GGUF
from test_gguf import llama_cpp_permute
from tiny import PRESETS, VOCAB, _bytes_to_unicode, hf_model, save_hf

from adainfer.exit import ExitRule, Plan, gap_rule
from adainfer.generate import generate
from adainfer.kv_cache import KVCache
from adainfer.loading import load_model
from adainfer.traces import collect
from weights_convert import convert

FAMILIES = ["qwen2-window", "qwen3-head-dim", "mistral-window", "gemma3-local"]


def prompts(n, seed=0, lo=10, hi=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def middle_gap(traces) -> float:
    """A gap threshold halfway between the two checked gaps nearest the median: no row sits on it, so a float
    rounding difference between a batch and one row cannot flip an exit."""
    gaps = np.sort(traces.features["gap"][:, :-1].ravel())
    m = len(gaps) // 2
    return float(gaps[m - 1] + gaps[m]) / 2


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=258)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("preset", FAMILIES)
def test_greedy_generation_equals_transformers(converted, preset):
    hf, folder = converted(preset)
    model, _ = load_model(folder, "float32")
    batch = prompts(3, seed=1)  # 10-30 tokens + 12 new: well past the windows of 8
    want = [hf_greedy(hf, ids, 12) for ids in batch]
    assert [g.token_ids for g in generate(model, batch, 12)] == want  # left-padded together
    assert [generate(model, [ids], 12)[0].token_ids for ids in batch] == want


@pytest.mark.parametrize("preset", ["qwen2-window", "mistral-window", "gemma3-local"])
def test_sliding_layers_keep_only_their_window(converted, preset):
    """A cache longer than the window holds the sliding layers' keys in a ring of the window's size (memory bounded
    by the window, however long the generation); 60 new tokens, a left-padded batch, equal transformers'."""
    hf, folder = converted(preset)
    model, _ = load_model(folder, "float32")
    c = model.config
    cache = KVCache(c, 2, 500, model.dtype)
    assert cache.ring == c.sliding_window == 8
    for i in range(c.n_layers):
        assert cache.k[i].shape[2] == (8 if c.sliding(i) else 500) and cache.v[i].shape == cache.k[i].shape
    assert any(c.sliding(i) for i in range(c.n_layers))
    assert KVCache(c, 2, 8, model.dtype).ring is None  # no longer than the window: a plain cache
    batch = prompts(2, seed=5)
    want = [hf_greedy(hf, ids, 60) for ids in batch]
    assert [g.token_ids for g in generate(model, batch, 60)] == want


@pytest.mark.parametrize("arch, extra, message", [
    ("opt", {"sliding_window": 4}, "OPT has none"), ("opt", {"attn_scale": -1.0}, "OPT has none"),
    ("qwen2", {"sliding_window": 10 ** 30}, "sliding_window"), ("qwen2", {"norm_unit_offset": "no"}, "true or false"),
    ("gemma3", {"activation": "relu"}, "activation"), ("gemma3", {"final_softcap": 0.0}, "final_softcap"),
    ("mistral", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding_window is not set"),
])
def test_bad_family_pieces_are_refused(arch, extra, message):
    from adainfer.config import ModelConfig
    from adainfer.errors import AdainferError

    base = dict(arch=arch, vocab_size=10, dim=8, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=16, max_seq_len=32)
    ModelConfig.from_dict(base)
    with pytest.raises(AdainferError, match=message):
        ModelConfig.from_dict({**base, **extra})


# ---------------------------------------------------------------- GGUF files of each family

# test_gguf's Llama names, plus the families' biases and q/k norms; Gemma names its norms apart (GEMMA_NORMS)
HF_TO_GGUF = {**{k: v for k, v in LLAMA_TO_GGUF.items() if k != "post_attention_layernorm.weight"},
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight"}
LLAMA_NORMS = {"post_attention_layernorm.weight": "ffn_norm.weight"}
GEMMA_NORMS = {"post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}

# (HF family preset kwargs, llama.cpp architecture): configs llama.cpp's converter can express. Mistral is written
# as llama.cpp writes it: arch "llama", q/k rows permuted, no window (Mistral v0.2 and later have none).
GGUF_CASES = {
    "qwen2": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False), "qwen2"),
    "qwen3": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=128, tie_word_embeddings=True), "qwen3"),
    "mistral": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False), "llama"),
    # llama.cpp's Gemma 3: every 6th layer global, local base 10000, query scale 1/sqrt(head_dim)
    "gemma3": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                    tie_word_embeddings=True), "gemma3"),
}


def sentencepiece_vocab():
    """A SentencePiece-style GGUF vocabulary as Gemma's: specials, the 256 byte tokens, scored pieces."""
    pieces = ["\u2581", "a", "b", "c", "e", "h", "l", "o", "w", "r", "d", "\u2581a", "ab", "abc", "he", "ll", "llo",
              "hello", "\u2581hello", "\u2581w", "or", "ld", "\u2581wor", "\u2581world", "\n"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces)  # llama.cpp: 3 control, 2 unknown, 6 byte, 1 normal
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def write_family_gguf(hf, family: str, arch: str, path, qtype_name: str, sentencepiece: bool = False):
    """A GGUF as llama.cpp's converter writes one for `arch`; sentencepiece=True: with Gemma's kind of vocabulary
    (no space prefix, BOS added) and the embedding resized to it, the head tied."""
    import gguf

    c = hf.config
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{family}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    if sentencepiece:
        tokens, types, scores = sentencepiece_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_unk_token_id(3)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
    else:
        w.add_vocab_size(c.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "default")
        chars = _bytes_to_unicode()
        # Two merged tokens in the last two ids: "12" and "34" join digits that GPT-2's split keeps together and
        # Qwen2's splits apart, so a wrong pre-tokenizer changes the ids.
        tokens = [chars[b] for b in range(256)] + ["<s>", "</s>", "12", "34"]
        w.add_token_list(tokens)
        w.add_token_types([1] * 256 + [3] * 2 + [1] * 2)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_merges(["1 2", "3 4"])
        w.add_bos_token_id(256)
        w.add_eos_token_id(257)
        w.add_add_bos_token(False)
    names = {**HF_TO_GGUF, **(GEMMA_NORMS if arch == "gemma3" else LLAMA_NORMS)}
    for name, t in hf.state_dict().items():
        t = t.float().numpy()
        if sentencepiece and name == "lm_head.weight":
            continue
        if sentencepiece and name == "model.embed_tokens.weight":
            t = np.random.default_rng(0).normal(0, 0.1, (len(tokens), t.shape[1])).astype(np.float32)
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{layer}.{names[rest]}"
        else:
            gname = names[name]
        if arch == "llama" and gname.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, c.num_key_value_heads)
        if arch == "gemma3" and gname.endswith("norm.weight"):
            t = t + 1  # llama.cpp's Gemma converters store 1 + w
        if t.ndim == 1 or qtype_name == "F32":
            w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def family_model(family: str, kwargs: dict, seed: int = 0):
    """A random-init transformers model of `family` with these config kwargs (norms and biases randomised)."""
    PRESETS[f"_case-{family}"] = (family, kwargs)
    try:
        return hf_model(f"_case-{family}", seed)
    finally:
        del PRESETS[f"_case-{family}"]


@pytest.mark.parametrize("family", list(GGUF_CASES))
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_of_each_family_matches_transformers(tmp_path, family, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs, arch = GGUF_CASES[family]
    hf = family_model(family, kwargs, seed=7)
    path = tmp_path / f"tiny-{family}-{qtype}.gguf"
    write_family_gguf(hf, family, arch, path, qtype)
    cfg = convert(path, tmp_path / "ours", progress=False)
    assert cfg.arch == ("llama" if family == "mistral" else family)
    ours, tok = load_model(tmp_path / "ours", "float32")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))  # past gemma's window of 8
    with torch.no_grad():
        want = ref(ids).logits[0, -1]
    assert (ours(ids).logits[0] - want).abs().max() <= 1e-4
    if qtype == "F32":  # lossless: the original model too, and transformers' tokenizer from the same file
        with torch.no_grad():
            assert (ours(ids).logits[0] - hf(ids).logits[0, -1]).abs().max() <= 1e-4
        hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        text = "GGUF tokenizers: byte-level, ünïcödé, 12345 digits!"
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
        digits = tok.encode("12345")  # Qwen2's split: one digit a piece; GPT-2's: "12345" merged to 12, 34, 5
        assert digits == ([ord("1"), ord("2"), ord("3"), ord("4"), ord("5")] if arch.startswith("qwen") else
                          [258, 259, ord("5")])


def test_gguf_layer_count_is_bounded_before_per_layer_lists(tmp_path):
    import gguf

    from adainfer.errors import AdainferError

    path = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1 << 31)  # a gemma3 layer_types list of 2^31 entries would hang the converter
    w.add_embedding_length(64)
    w.add_head_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(AdainferError, match="block_count 2147483648 is not in 1..4096"):
        convert(path, tmp_path / "ours", progress=False)
    assert not (tmp_path / "ours").exists()


def test_gemma_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    """Gemma's GGUF vocabulary: SentencePiece-style pieces with byte fallback, no space prefix, BOS added."""
    from transformers import AutoTokenizer

    kwargs, arch = GGUF_CASES["gemma3"]
    path = tmp_path / "gemma-sp.gguf"
    write_family_gguf(family_model("gemma3", kwargs, seed=7), "gemma3", arch, path, "F32", sentencepiece=True)
    cfg = convert(path, tmp_path / "ours", progress=False)
    assert cfg.add_bos and cfg.bos_id == 2 and cfg.tie_embeddings
    _, tok = load_model(tmp_path / "ours", "float32")
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello world", " hello  world\nabc", "h\u00e9llo w\u00f6rld xyz", "abcab hello"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids, text
        assert ids[0] == 2 and tok.decode(ids) == text


# ---------------------------------------------------------------- exits on every family


@pytest.mark.parametrize("preset", FAMILIES)
def test_exits_on_every_family(converted, preset):
    """The check reads the family's own final norm and soft-capping: recorded features equal a softmax of
    model.head on the block's hidden state; rows exit at different layers and answer with that layer's head; the
    int8 check head, candidate mode and a translator run on it; a batch equals its rows one by one."""
    from adainfer.generate import left_pad

    _, folder = converted(preset)
    model, _ = load_model(folder, "float32")
    batch = prompts(6, seed=3)
    tokens, mask = left_pad(batch, 0)
    hs = model(tokens, pad_mask=mask, plan=Plan(hidden_states=True)).hidden_states
    traces = collect(model, batch, progress=False)
    threshold = middle_gap(traces)
    rule = ExitRule(gap_rule(threshold))
    out = model(tokens, pad_mask=mask, plan=Plan(exit=rule, record_features=True))
    for rec in out.features:
        p = model.head(hs[rec["layer"]][rec["rows"], -1]).softmax(-1).topk(2, -1).values
        assert (rec["gap"] - (p[:, 0] - p[:, 1])).abs().max() < 1e-5
    L = model.config.n_layers
    for b, n in enumerate(out.layers_run.tolist()):
        assert (out.logits[b] - model.head(hs[n][b:b + 1, -1])[0]).abs().max() < 1e-4
        alone = model(torch.tensor([batch[b]]), plan=Plan(exit=rule))
        assert int(alone.layers_run[0]) == n and (alone.logits[0] - out.logits[b]).abs().max() < 1e-4
    assert len(set(out.layers_run.tolist())) > 1 or L <= 2
    if model.config.final_softcap is not None:  # the cap bounds every answer
        assert float(out.logits.abs().max()) <= model.config.final_softcap
    int8 = model(tokens, pad_mask=mask, plan=Plan(exit=rule, check_head="int8"))
    assert int8.logits.shape == out.logits.shape
    cands = torch.tensor([65, 66, 67])
    restricted = model(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(gap_rule(0.0)), candidates=cands))
    assert set(restricted.token.tolist()) <= set(cands.tolist())
    clf = gap_rule(threshold)
    clf.translator = random_translator(model.config.dim, range(1, L), scale=0.02)
    read = model(tokens, pad_mask=mask, plan=Plan(exit=ExitRule(clf)))
    assert read.logits.shape == out.logits.shape and bool(torch.isfinite(read.logits).all())


@pytest.mark.parametrize("preset", ["mistral-window", "gemma3-local"])
def test_exit_generation_in_a_batch_equals_one_by_one(converted, preset):
    """Sequence mode (rows decode at their own depths, in row groups) and token mode (per-token exits, the skipped
    layers' K/V filled from the exit state) over ring caches: a batch gives each row's tokens and layers alone."""
    _, folder = converted(preset)
    model, _ = load_model(folder, "float32")
    batch = prompts(4, seed=6)
    traces = collect(model, batch, progress=False)
    plan = Plan(exit=ExitRule(gap_rule(middle_gap(traces))))
    for mode in ("sequence", "token"):
        together = generate(model, batch, 16, plan, mode=mode)
        assert len({tuple(g.layers_run) for g in together}) > 1, "rows should exit at different layers"
        for b, ids in enumerate(batch):
            alone = generate(model, [ids], 16, plan, mode=mode)[0]
            assert alone.token_ids == together[b].token_ids and alone.layers_run == together[b].layers_run


@pytest.mark.slow
def test_compiled_and_int4_decode_graphs_on_gemma3(converted):
    """The decode graphs over Gemma 3's pieces and ring caches: compiled to the block loop's 1e-4 and its greedy
    tokens; int4 within the int8-activation tolerance of test_fast_decode."""
    from test_fast_decode import PROMPTS, step_logits

    from adainfer.fast_decode import decode_graph

    _, folder = converted("gemma3-local", seed=3)
    model, _ = load_model(folder, "float32")
    graph = decode_graph(model, "compiled")
    ref, got = step_logits(model, graph, 8)  # prompts of 3-9 tokens + 8 steps: past the window of 8
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert [g.token_ids for g in generate(model, PROMPTS, 20, graph=graph)] == \
        [g.token_ids for g in generate(model, PROMPTS, 20)]
    model, _ = load_model(folder, "float32")
    ref, got = step_logits(model, decode_graph(model, "int4"), 8)  # both on the rounded weights
    assert float((got - ref).abs().max()) <= 4e-2 * float(ref.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_calibrate_and_eval_on_every_family(converted, tmp_path, preset):
    """Calibration and evaluation as a user runs them, on each family."""
    _, folder = converted(preset)
    rows = tmp_path / "t.jsonl"
    g = np.random.default_rng(0)
    rows.write_text("".join(json.dumps({"prompt": "".join(chr(c) for c in g.integers(97, 123, 20)), "answer": " x"})
                            + "\n" for _ in range(16)))
    clf = tmp_path / "c.json"
    proc = run_cli("adainfer.calibrate", "--model", folder, "--prompts", rows, "--dtype", "float32", "--out", clf)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(clf.read_text())["kind"] == "svm"
    out = tmp_path / "e.json"
    proc = run_cli("adainfer.eval", "--model", folder, "--task-file", rows, "--method", "dense", "gap-rule",
                   "--dtype", "float32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


# ---------------------------------------------------------------- the bar: configs the other tests do not use

UNSEEN = {
    "qwen2": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=5, num_attention_heads=6,
                  num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=2,
                  tie_word_embeddings=True, rope_theta=100000.0),
    "qwen3": dict(hidden_size=80, intermediate_size=144, num_hidden_layers=4, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=12, tie_word_embeddings=False),
    "mistral": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=5, num_attention_heads=3,
                    num_key_value_heads=3, sliding_window=5, tie_word_embeddings=True),
    "gemma3": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=6, num_attention_heads=3,
                   num_key_value_heads=1, head_dim=40, query_pre_attn_scalar=50, sliding_window=5,
                   final_logit_softcapping=12.0, tie_word_embeddings=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(UNSEEN))
def test_run_cli_reproduces_transformers_greedy_tokens_on_unseen_configs(tmp_path, family):
    from tiny import byte_tokenizer

    hf = family_model(family, dict(UNSEEN[family], max_position_embeddings=256), seed=13)
    src = save_hf(hf, tmp_path / "hf")
    proc = run_cli("weights_convert", src, tmp_path / "ours")
    assert proc.returncode == 0, proc.stderr
    prompt = "The window is shorter than this prompt, by a lot."
    ids = byte_tokenizer().encode(prompt).ids
    r = run_cli("adainfer.run", "--model", tmp_path / "ours", "--prompt", prompt, "--max-new-tokens", "10", "--dense",
                "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == hf_greedy(hf, ids, 10)
    assert VOCAB == hf.config.vocab_size
