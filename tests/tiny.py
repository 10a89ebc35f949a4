"""Tiny random-init Hugging Face models (no download) and a byte-level tokenizer, for tests and examples."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 260  # 256 byte tokens + 4 specials

# Shrunk presets: each is (family, Hugging Face config kwargs).
PRESETS = {
    "llama-mha": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa-tied": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-rope-scaling": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         rope_theta=500000.0,
                                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32})),
    # The other Llama-shaped families, each with its distinctive pieces on: windows shorter than the test prompts.
    "qwen2-window": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=True,
                                   sliding_window=8, max_window_layers=1)),  # q/k/v biases; layers 1-2 sliding
    "qwen3-head-dim": ("qwen3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),  # 24 != 64 / 4
    "mistral-window": ("mistral", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                       tie_word_embeddings=False)),
    "gemma3-local": ("gemma3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                                    layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                 "sliding_attention"],
                                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 1_000_000.0},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 10_000.0}},
                                    final_logit_softcapping=5.0, tie_word_embeddings=True)),
    "opt-125m-like": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                  word_embed_proj_dim=64, do_layer_norm_before=True)),
    "opt-350m-like": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                  word_embed_proj_dim=32, do_layer_norm_before=False)),
}


def hf_model(preset: str, seed: int = 0, n_layers: int | None = None):
    """A random-init transformers model of a shrunk preset, in float32 eval mode."""
    import transformers as t

    classes = {"llama": (t.LlamaConfig, t.LlamaForCausalLM), "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
               "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM), "mistral": (t.MistralConfig, t.MistralForCausalLM),
               "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM)}
    family, kwargs = PRESETS[preset]
    kwargs = dict(kwargs, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
                  pad_token_id=258)
    if n_layers is not None:
        kwargs["num_hidden_layers"] = n_layers
    torch.manual_seed(seed)
    if family in classes:
        config_class, model_class = classes[family]
        model = model_class(config_class(**kwargs, initializer_range=0.1))
    else:
        model = t.OPTForCausalLM(t.OPTConfig(**kwargs, init_std=0.1))
    # Random LayerNorm / RMSNorm gains and biases, so that a norm applied wrongly cannot hide (Gemma's norms scale by
    # 1 + weight: their weights around 0).
    gain = 0.0 if family == "gemma3" else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(gain + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is one token, ids 0..255; specials 256..259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for i, special in enumerate(["<s>", "</s>", "<pad>", "<unk>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>", "<unk>"])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def save_hf(model, folder: Path, shard: str | None = None, safe: bool = True) -> Path:
    """save_pretrained plus a tokenizer.json; `shard` like "20KB" writes sharded files with an index."""
    folder = Path(folder)
    kwargs = {"safe_serialization": safe}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(folder, **kwargs)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def make_converted(preset: str, root: Path, seed: int = 0, dtype: str = "float32", n_layers: int | None = None):
    """(transformers model, converted adainfer folder) for a preset, through the real converter."""
    from weights_convert import convert

    model = hf_model(preset, seed, n_layers)
    src = save_hf(model, Path(root) / f"{preset}-hf")
    dst = Path(root) / f"{preset}-ours"
    convert(src, dst, dtype=dtype, progress=False)
    return model, dst


def truncated_copy(folder, k, dst):
    """The same model with only its first k blocks: our config with n_layers=k and those blocks' tensors."""
    import json

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "n_layers": k}))
    state = load_file(folder / "model.safetensors")
    keep = {n: t for n, t in state.items() if not n.startswith("layers.") or int(n.split(".")[1]) < k}
    save_file(keep, dst / "model.safetensors")
    return dst
