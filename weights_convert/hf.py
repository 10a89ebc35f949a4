"""Hugging Face model folders (Llama, Qwen2, Qwen3, Mistral, Gemma 3 text and OPT) -> adainfer config and tensors.

One literal weight map per family, from Hugging Face names to ours: `{}` stands for the layer index and `None`
marks keys that are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from adainfer.checks import check_safetensors
from adainfer.config import MAX_LAYERS, ModelConfig, check_rope_scaling
from adainfer.errors import AdainferError

LLAMA_WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",  # Qwen2; Llama's attention_bias
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",  # Llama's attention_bias
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",  # Qwen3
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

OPT_WEIGHT_MAP = {
    "model.decoder.embed_tokens.weight": "tok_embeddings.weight",
    "model.decoder.embed_positions.weight": "pos_embeddings.weight",
    "model.decoder.project_in.weight": "project_in.weight",
    "model.decoder.project_out.weight": "project_out.weight",
    "model.decoder.final_layer_norm.weight": "norm.weight",
    "model.decoder.final_layer_norm.bias": "norm.bias",
    "model.decoder.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.decoder.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.decoder.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.decoder.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.decoder.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.decoder.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.decoder.layers.{}.self_attn.out_proj.weight": "layers.{}.attention.wo.weight",
    "model.decoder.layers.{}.self_attn.out_proj.bias": "layers.{}.attention.wo.bias",
    "model.decoder.layers.{}.self_attn_layer_norm.weight": "layers.{}.attention_norm.weight",
    "model.decoder.layers.{}.self_attn_layer_norm.bias": "layers.{}.attention_norm.bias",
    "model.decoder.layers.{}.fc1.weight": "layers.{}.feed_forward.w1.weight",
    "model.decoder.layers.{}.fc1.bias": "layers.{}.feed_forward.w1.bias",
    "model.decoder.layers.{}.fc2.weight": "layers.{}.feed_forward.w2.weight",
    "model.decoder.layers.{}.fc2.bias": "layers.{}.feed_forward.w2.bias",
    "model.decoder.layers.{}.final_layer_norm.weight": "layers.{}.ffn_norm.weight",
    "model.decoder.layers.{}.final_layer_norm.bias": "layers.{}.ffn_norm.bias",
    "lm_head.weight": "output.weight",
}

# Gemma 3 names its four norms by place: its post_attention_layernorm follows attention (our post_attention_norm),
# where Llama's of that name comes before the MLP (our ffn_norm, Gemma's pre_feedforward_layernorm).
GEMMA3_WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

WEIGHT_MAPS = {"llama": LLAMA_WEIGHT_MAP, "qwen2": LLAMA_WEIGHT_MAP, "qwen3": LLAMA_WEIGHT_MAP,
               "mistral": LLAMA_WEIGHT_MAP, "gemma3": GEMMA3_WEIGHT_MAP, "opt": OPT_WEIGHT_MAP}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "gemma3_text": "gemma3",
               "opt": "opt"}


def config_from_hf(hf: dict, where: object) -> ModelConfig:
    """Our config from a Hugging Face config.json (already parsed)."""
    kind = hf.get("model_type")
    if not isinstance(kind, str):
        raise AdainferError(where, f"model_type must be a string, got {kind!r}")
    if kind == "gemma3":
        raise AdainferError(where, "model_type 'gemma3' is the multimodal Gemma 3; adainfer runs its text model "
                                   "(model_type 'gemma3_text': Gemma 3 1B, or the text_config part of a larger one)")
    if kind not in MODEL_TYPES:
        raise AdainferError(where, f"unknown architecture: model_type {kind!r} (supported: {', '.join(MODEL_TYPES)})")
    try:
        return _opt_config(hf, where) if kind == "opt" else _llama_config(hf, where, MODEL_TYPES[kind])
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise AdainferError(where, f"config is missing or has a bad value for {e}") from None


def _first(x):
    return x[0] if isinstance(x, list) and x else (x if not isinstance(x, list) else None)


def _rope(params: object, hf: dict, where: object, theta_key: str = "rope_theta", default_theta: float = 10000.0,
          scaling_key: str | None = "rope_scaling") -> tuple[float, dict | None]:
    """(rotary base, scaling or None) from transformers 5's rope_parameters (`params`) or the older top-level keys."""
    rope = params or {}
    if not isinstance(rope, dict):
        raise AdainferError(where, f"rope_parameters must be an object, got {rope!r}")
    rope = dict(rope)
    theta = rope.pop("rope_theta", hf.get(theta_key, default_theta))
    if rope.get("rope_type", "default") == "default":
        rope = (hf.get(scaling_key) if scaling_key else None) or None
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "default":
        rope = None
    check_rope_scaling(rope, where)
    return theta, rope


def _llama_config(hf: dict, where: object, arch: str) -> ModelConfig:
    """Llama and the families built on it; each family's pieces from its own config keys."""
    if hf.get("mlp_bias"):
        raise AdainferError(where, f"{arch} with mlp_bias is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if act not in acts or (arch != "gemma3") != (act == "silu"):
        raise AdainferError(where, f"{arch} activation {act!r} is not supported")
    heads = hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 0 < n_layers <= MAX_LAYERS:
        raise AdainferError(where, f"num_hidden_layers must be an integer in 1..{MAX_LAYERS}, got {n_layers!r}")
    pieces: dict = {}
    if arch == "gemma3":
        if hf.get("attn_logit_softcapping") is not None:
            raise AdainferError(where, "attention logit soft-capping is not supported (Gemma 3 releases have none)")
        if hf.get("use_bidirectional_attention"):
            raise AdainferError(where, "bidirectional Gemma 3 (an embedding model) is not a decoder")
        params = hf.get("rope_parameters") or {}
        if not isinstance(params, dict):
            raise AdainferError(where, f"rope_parameters must be an object, got {params!r}")
        full = params.get("full_attention") if "full_attention" in params else None
        local = params.get("sliding_attention") if "sliding_attention" in params else None
        theta, rope = _rope(full, hf, where, default_theta=1_000_000.0)
        local_theta, local_scaling = _rope(local, hf, where, "rope_local_base_freq", 10_000.0, None)
        if local_scaling is not None:
            raise AdainferError(where, "rope scaling on Gemma 3's sliding layers is not supported")
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                          for i in range(n_layers)]
        window = hf.get("sliding_window", 4096)
        softcap = hf.get("final_logit_softcapping")
        pieces = dict(qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")), qk_norm=True,
                      norm_unit_offset=True, embed_scale=float(hf["hidden_size"]) ** 0.5, activation="gelu_tanh",
                      sandwich_norm=True, attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                      sliding_window=window if "sliding_attention" in types else None,
                      layer_types=types if "sliding_attention" in types else None, rope_local_theta=local_theta,
                      final_softcap=None if softcap is None else float(softcap))
    else:
        theta, rope = _rope(hf.get("rope_parameters"), hf, where)
        bias = bool(hf.get("attention_bias"))
        pieces = dict(qkv_bias=bias or arch == "qwen2", o_bias=bias, qk_norm=arch == "qwen3")
        if arch in ("qwen2", "qwen3"):
            window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
            types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= hf.get(
                "max_window_layers", 28) else "full_attention" for i in range(n_layers)]
            if window is not None and "sliding_attention" in types:
                pieces.update(sliding_window=window, layer_types=types)
        elif arch == "mistral":
            if hf.get("layer_types"):
                raise AdainferError(where, "Mistral with layer_types (Ministral's alternating attention) is not "
                                           "supported")
            pieces.update(sliding_window=hf.get("sliding_window", 4096))
    return ModelConfig(
        arch=arch, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers,
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads, hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        head_dim=hf.get("head_dim") or 0, rope_theta=theta, rope_scaling=rope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", arch == "gemma3")), bos_id=hf.get("bos_token_id"),
        eos_id=_first(hf.get("eos_token_id")), pad_id=_first(hf.get("pad_token_id")),
        name=hf.get("_name_or_path", ""), **pieces,
    )


def _opt_config(hf: dict, where: object) -> ModelConfig:
    if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
        raise AdainferError(where, "OPT without biases or without affine LayerNorm is not supported")
    if hf.get("activation_function", "relu") != "relu":
        raise AdainferError(where, f"OPT activation {hf.get('activation_function')!r} is not supported (relu only)")
    pre = bool(hf.get("do_layer_norm_before", True))
    return ModelConfig(
        arch="opt", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_attention_heads"], hidden_dim=hf["ffn_dim"],
        max_seq_len=hf["max_position_embeddings"], norm_eps=1e-5, pre_norm=pre,
        embed_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
        final_norm=pre and not hf.get("_remove_final_layer_norm", False),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), bos_id=hf.get("bos_token_id"),
        eos_id=_first(hf.get("eos_token_id")), pad_id=_first(hf.get("pad_token_id")),
        name=hf.get("_name_or_path", ""),
    )


def read_json(path: Path, what: str, limit: int = 64 << 20) -> dict:
    if not path.is_file():
        raise AdainferError(path, f"{what} not found")
    raw = path.read_bytes()
    if len(raw) > limit:
        raise AdainferError(path, f"{what} is {len(raw)} bytes (limit {limit})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdainferError(path, f"malformed JSON in {what}: {e}") from None
    if not isinstance(data, dict):
        raise AdainferError(path, f"{what} must be a JSON object")
    return data


def checkpoint_files(src: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a Hugging Face folder: sharded or single, safetensors preferred over pickle."""
    for index_name, single, pickled in (("model.safetensors.index.json", "model.safetensors", False),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin", True)):
        index, one = src / index_name, src / single
        if not (index.exists() or one.exists()):
            continue
        if pickled and not allow_pickle:
            raise AdainferError(one if one.exists() else index, "pickle checkpoints can run code when loaded; "
                                "pass --allow-pickle to load it (with torch.load(weights_only=True))")
        if not index.exists():
            return [one]
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise AdainferError(index, "shard index has no weight_map of tensor name -> file")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if (not name or "\x00" in name or "/" in name or "\\" in name or name in (".", "..")
                    or len(name.encode("utf-8", "surrogatepass")) > 255):
                raise AdainferError(index, f"shard name {name[:80]!r} is not a file name in the model folder")
            shard = src / name
            try:
                ok = shard.is_file()
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise AdainferError(index, f"shard {name!r} is missing")
            files.append(shard)
        return files
    raise AdainferError(src, "no model.safetensors, sharded safetensors or pytorch_model*.bin found")


def load_hf_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        tensors[name] = f.get_tensor(name)
            except Exception as e:  # the library's error types vary between versions
                raise AdainferError(path, f"cannot read safetensors: {e}") from None
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise AdainferError(path, f"cannot read pickle checkpoint: {e}") from None
            if not isinstance(state, dict):
                raise AdainferError(path, "pickle checkpoint does not hold a state dict")
            tensors.update(state)
    return tensors


def rename_hf_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, where: object) -> dict[str, torch.Tensor]:
    """Hugging Face names -> ours through the family's literal map; unknown names are an error."""
    patterns = WEIGHT_MAPS[config.arch]
    out = {}
    for name, tensor in tensors.items():
        key = name
        if config.arch == "opt" and key.startswith("decoder."):  # original facebook/opt checkpoints
            key = "model." + key
        parts = key.split(".")
        layer = next((p for p in parts if p.isdigit()), None)
        template = key if layer is None else key.replace(f".{layer}.", ".{}.", 1)
        if template not in patterns:
            raise AdainferError(where, f"unexpected tensor {name!r} for a {config.arch} model")
        ours = patterns[template]
        if ours is None:
            continue
        out[ours if layer is None else ours.format(layer)] = tensor
    if config.tie_embeddings:
        out.pop("output.weight", None)  # some tied checkpoints store the head too
    return out
