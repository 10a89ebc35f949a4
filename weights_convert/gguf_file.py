"""GGUF (llama.cpp) files of the llama (Llama, Mistral), qwen2, qwen3 and gemma3 architectures -> adainfer config,
tensors and a `tokenizers` tokenizer.

The header is parsed and bounded by adainfer.checks first; tensors are read from the validated offsets and
dequantized with the gguf package. llama.cpp stores q and k rows interleaved for its rotary kernel; we undo that.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from adainfer.checks import GGUFFile
from adainfer.config import MAX_LAYERS, ModelConfig
from adainfer.errors import AdainferError

GGUF_WEIGHT_MAP = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_q.bias": "layers.{}.attention.wq.bias",  # qwen2
    "blk.{}.attn_k.bias": "layers.{}.attention.wk.bias",
    "blk.{}.attn_v.bias": "layers.{}.attention.wv.bias",
    "blk.{}.attn_q_norm.weight": "layers.{}.attention.q_norm.weight",  # qwen3, gemma3
    "blk.{}.attn_k_norm.weight": "layers.{}.attention.k_norm.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.post_attention_norm.weight": "layers.{}.post_attention_norm.weight",  # gemma3
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",  # (gemma3's pre-feedforward norm)
    "blk.{}.post_ffw_norm.weight": "layers.{}.post_ffn_norm.weight",  # gemma3
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")

# llama.cpp's architectures -> ours. Mistral's GGUF files say "llama" (and run as Llama in llama.cpp: no window).
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
# Only llama.cpp's "llama" converter interleaves q/k rows for its rotary kernel; qwen2, qwen3 and gemma3 keep
# Hugging Face's rotate-half rows (NEOX rotary). Gemma's converter stores every RMSNorm weight as 1 + w.
PERMUTED = ("llama",)
GEMMA_SWA_PATTERN = 6  # llama.cpp and transformers alike: every 6th Gemma 3 layer is global


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    meta = g.metadata
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise AdainferError(g.path, f"unknown architecture {arch!r} in GGUF (supported: {', '.join(GGUF_ARCHS)})")
    if "rope_freqs.weight" in g.tensors:
        raise AdainferError(g.path, "GGUF with rope_freqs (Llama-3.1 rope scaling) is not supported; "
                                    "convert the Hugging Face folder instead")

    def get(key, default=None, kind=(int,)):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise AdainferError(g.path, f"GGUF metadata {arch}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise AdainferError(g.path, f"GGUF metadata {arch}.{key} has a bad value {value!r}")
        return value

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    heads = get("attention.head_count")
    dim = get("embedding_length")
    n_layers = get("block_count")
    number = (int, float)
    if arch == "llama":
        head_dim = get("rope.dimension_count", dim // heads if heads else 0)
    else:
        head_dim = get("attention.key_length", dim // heads if heads else 0)
    pieces: dict = {}
    rope_scaling = None
    theta = float(get("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10000.0, number))
    if arch == "qwen2":
        pieces = dict(qkv_bias=True)
    elif arch == "qwen3":
        pieces = dict(qk_norm=True)
    elif arch == "gemma3":
        if not 0 < n_layers <= MAX_LAYERS:  # before the per-layer list below
            raise AdainferError(g.path, f"GGUF metadata {arch}.block_count {n_layers} is not in 1..{MAX_LAYERS}")
        window = get("attention.sliding_window", 4096)
        types = ["sliding_attention" if (i + 1) % GEMMA_SWA_PATTERN else "full_attention" for i in range(n_layers)]
        # llama.cpp's query scale: 1/sqrt(head_dim), but 1/sqrt(dim / heads) for the 27B (62 layers), which is what
        # each release's query_pre_attn_scalar says.
        scalar = dim / heads if n_layers == 62 else head_dim
        kind = meta.get(f"{arch}.rope.scaling.type")
        if kind not in (None, "none"):
            if kind != "linear":
                raise AdainferError(g.path, f"GGUF rope scaling {kind!r} is not supported for gemma3 (linear only)")
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", None, number))}
        softcap = meta.get(f"{arch}.final_logit_softcapping")
        pieces = dict(qk_norm=True, norm_unit_offset=True, embed_scale=float(dim) ** 0.5, activation="gelu_tanh",
                      sandwich_norm=True, attn_scale=float(scalar) ** -0.5,
                      sliding_window=window if "sliding_attention" in types else None,
                      layer_types=types if "sliding_attention" in types else None, rope_local_theta=10000.0,
                      final_softcap=None if softcap is None else float(softcap))
    add_bos_default = meta.get("tokenizer.ggml.model") == "llama"
    return ModelConfig(
        arch=GGUF_ARCHS[arch], vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=heads,
        n_kv_heads=get("attention.head_count_kv", heads), hidden_dim=get("feed_forward_length"),
        max_seq_len=get("context_length", 2048), norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5, number)),
        head_dim=head_dim, rope_theta=theta, rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in g.tensors,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        name=str(meta.get("general.name", "")), **pieces,
    ).validate(g.path)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs) back to Hugging Face's rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf_tensors(g: GGUFFile, config: ModelConfig, progress=None):
    """Yield (our name, float32 tensor) for every tensor of the file, dequantized and un-permuted."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    arch = g.metadata.get("general.architecture")
    data = np.memmap(g.path, dtype=np.uint8, mode="r")
    for name, info in g.tensors.items():
        parts = name.split(".")
        layer = parts[1] if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None
        template = name if layer is None else name.replace(f"blk.{layer}.", "blk.{}.", 1)
        ours = GGUF_WEIGHT_MAP.get(template)
        if ours is None:
            raise AdainferError(g.path, f"unexpected tensor {name!r} in a {arch} GGUF")
        if info.dtype not in SUPPORTED_TYPES:
            raise AdainferError(g.path, f"tensor {name!r}: GGML type {info.dtype} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
        qtype = GGMLQuantizationType[info.dtype]
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        raw = data[info.start:info.start + info.nbytes].reshape(rows, info.shape[-1] // block * type_size)
        try:
            with np.errstate(all="ignore"):  # bad scales give inf/NaN: refused below, not warned about
                values = dequantize(raw, qtype)
        except Exception as e:  # the gguf package raises assorted errors on bad blocks
            raise AdainferError(g.path, f"tensor {name!r}: cannot dequantize {info.dtype}: {e}") from None
        t = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(info.shape)  # a writable copy
        if not bool(torch.isfinite(t).all()):
            raise AdainferError(g.path, f"tensor {name!r} holds inf or NaN values")
        if arch in PERMUTED and template == "blk.{}.attn_q.weight":
            t = unpermute(t, config.n_heads)
        elif arch in PERMUTED and template == "blk.{}.attn_k.weight":
            t = unpermute(t, config.n_kv_heads)
        elif config.norm_unit_offset and template.endswith("norm.weight"):
            t = t - 1  # llama.cpp stores Gemma's norms as 1 + w; our RMSNorm adds the 1
        if progress is not None:
            progress.update(1)
        yield (ours if layer is None else ours.format(layer)), t


# ---------------------------------------------------------------- tokenizer


def tokenizer_from_gguf(g: GGUFFile):
    """A `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary (and merges, for byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    meta = g.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise AdainferError(g.path, "GGUF has no tokenizer.ggml.tokens string array")
    types = meta.get("tokenizer.ggml.token_type") or []
    if kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges", [])  # absent: every token is whole already
        if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
            raise AdainferError(g.path, "tokenizer.ggml.merges must be a list of \"left right\" strings")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        try:
            tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False))
        except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocabulary
            raise AdainferError(g.path, f"GGUF tokenizer is inconsistent: {e}") from None
        tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"), pre_tokenizers, Regex)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":  # SentencePiece vocabulary: merges recovered from the scores, as transformers does
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise AdainferError(g.path, "SentencePiece GGUF tokenizer needs one score per token")
        vocab = {t: i for i, t in enumerate(tokens)}
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        if not isinstance(unk, int) or not 0 <= unk < len(tokens):
            raise AdainferError(g.path, f"tokenizer.ggml.unknown_token_id {unk!r} is not a token")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(vocab, dict(zip(tokens, scores))),
                                   fuse_unk=True, byte_fallback=True, dropout=None, unk_token=tokens[unk]))
        # Llama's SentencePiece prepends a space to the text; Gemma's does not (tokenizer.ggml.add_space_prefix).
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
        scheme = "first" if prefix else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    else:
        raise AdainferError(g.path, f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    # llama.cpp token types: 3 = control (special), 4 = user-defined (matched whole, not special)
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok


# llama.cpp's pre-tokenizer names -> how text is split before byte-level BPE
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level_pre_tokenizer(pre: str | None, pre_tokenizers, Regex):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":  # SmolLM's tokenizer.json: every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "qwen2":  # Qwen2 / Qwen2.5 / Qwen3: Llama 3's split with every digit alone
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    print(f"warning: GGUF pre-tokenizer {pre!r} is not known here; using GPT-2's split, which may tokenize "
          "some text differently from llama.cpp", file=sys.stderr)
    return byte_level


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge, ranked by the merged token's score (best first)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
