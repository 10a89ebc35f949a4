"""adainfer's own model config: one dataclass for every family, stored as `config.json`.

`arch` names the family; the model reads the numbered pieces below it (biases, q/k norms, the norm's formula, the
MLP's activation, sliding-window layers, soft-capping), so the families share one block loop. Only the converter
(weights_convert) builds one from a Hugging Face config or a GGUF file; everything else reads ours.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from adainfer.errors import AdainferError

ARCHS = ("llama", "opt", "qwen2", "qwen3", "mistral", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
FORMAT_VERSION = 1
MAX_LAYERS = 4096  # the converters build per-layer lists from a file's layer count before validate() sees it


@dataclass
class ModelConfig:
    arch: str  # one of ARCHS; every family but "opt" is Llama-shaped (rotary, RMSNorm, gated MLP)
    vocab_size: int
    dim: int  # width of the residual stream
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention (Llama only)
    hidden_dim: int  # inner width of the MLP
    max_seq_len: int  # longest prompt + generation the position scheme supports
    norm_eps: float = 1e-5
    head_dim: int = 0  # 0: dim // n_heads (some Llama variants set it explicitly)
    # Llama family
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or linear
    tie_embeddings: bool = False
    # the pieces in which the Llama-shaped families differ (defaults: Llama)
    qkv_bias: bool = False  # biases on q, k, v (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # a bias on the attention output (Llama's attention_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3)
    norm_unit_offset: bool = False  # Gemma's RMSNorm: x * (1 + weight), scaled in float32 before the cast back
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(dim), rounded to the model's dtype)
    activation: str = "silu"  # the gated MLP's: silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)
    sandwich_norm: bool = False  # a norm after attention and after the MLP too, before each residual add (Gemma 3)
    attn_scale: float | None = None  # softmax scale of q.k; None: head_dim ** -0.5 (Gemma 3: query_pre_attn_scalar)
    sliding_window: int | None = None  # a sliding layer's query sees at most this many keys (itself included)
    layer_types: list[str] | None = None  # per layer: full_attention or sliding_attention; None: all sliding if
    #                                       sliding_window is set (Mistral), else all full
    rope_local_theta: float | None = None  # sliding layers' rotary base, without scaling (Gemma 3); None: as full
    final_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma's final_logit_softcapping)
    # OPT family
    pre_norm: bool = True  # OPT's do_layer_norm_before; opt-350m is post-LN
    embed_dim: int = 0  # OPT's word_embed_proj_dim; != dim adds project_in / project_out (opt-350m)
    final_norm: bool = True  # post-LN OPT has no final LayerNorm
    # tokens
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False  # prepend bos_id to every prompt (Llama-2 style); SmolLM2 does not
    name: str = ""  # where the weights came from, for humans
    format_version: int = FORMAT_VERSION

    @property
    def rotary(self) -> bool:
        """Rotary positions (every family but OPT, which learns absolute ones)."""
        return self.arch != "opt"

    def sliding(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def __post_init__(self):
        if self.head_dim == 0 and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        if self.embed_dim == 0:
            self.embed_dim = self.dim

    def validate(self, where: object = "config") -> ModelConfig:
        """Raise AdainferError naming `where` unless every field is usable."""
        if self.arch not in ARCHS:
            raise AdainferError(where, f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len",
                     "head_dim", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AdainferError(where, f"{name} must be a positive integer, got {value!r}")
            if value > 1 << 24:
                raise AdainferError(where, f"{name}={value} is beyond any model this library can hold")
        if self.n_heads % self.n_kv_heads:
            raise AdainferError(where, f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rotary:
            if self.head_dim % 2:
                raise AdainferError(where, f"head_dim={self.head_dim} must be even for rotary embeddings")
            if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta)
                    and self.rope_theta > 0):
                raise AdainferError(where, f"rope_theta must be a positive number, got {self.rope_theta!r}")
            check_rope_scaling(self.rope_scaling, where)
            self._validate_family(where)
        else:
            set_ = [f.name for f in fields(self) if f.name in FAMILY_PIECES and getattr(self, f.name) != f.default]
            if set_:
                raise AdainferError(where, f"OPT has none of the Llama-family pieces; {', '.join(set_)} set")
            if self.n_kv_heads != self.n_heads or self.head_dim * self.n_heads != self.dim:
                raise AdainferError(where, "OPT needs n_kv_heads == n_heads and head_dim * n_heads == dim")
        if not (isinstance(self.norm_eps, (int, float)) and math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise AdainferError(where, f"norm_eps must be a positive number, got {self.norm_eps!r}")
        for name in ("bos_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise AdainferError(where, f"{name}={value!r} is not a token id below vocab_size={self.vocab_size}")
        if self.add_bos and self.bos_id is None:
            raise AdainferError(where, "add_bos is set but bos_id is missing")
        return self

    def _validate_family(self, where: object) -> None:
        for name in ("qkv_bias", "o_bias", "qk_norm", "norm_unit_offset", "sandwich_norm"):
            if not isinstance(getattr(self, name), bool):
                raise AdainferError(where, f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise AdainferError(where, f"activation {self.activation!r} is not supported ({', '.join(ACTIVATIONS)})")
        for name in ("embed_scale", "attn_scale", "rope_local_theta", "final_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise AdainferError(where, f"{name} must be a positive number, got {value!r}")
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= 1 << 24):
            raise AdainferError(where, f"sliding_window must be a positive integer (at most 2^24) or null, got {w!r}")
        types = self.layer_types
        if types is not None:
            if not isinstance(types, list) or len(types) != self.n_layers or any(t not in LAYER_TYPES for t in types):
                raise AdainferError(where, f"layer_types must list {self.n_layers} of {', '.join(LAYER_TYPES)}")
            if w is None and "sliding_attention" in types:
                raise AdainferError(where, "layer_types has sliding layers but sliding_window is not set")

    def fingerprint_dict(self) -> dict:
        """The numbers that define the model, for its fingerprint: not `name` or `format_version`."""
        return {k: v for k, v in self.to_dict().items() if k not in ("name", "format_version")}

    def to_dict(self) -> dict:
        """Every field, but the family pieces only where they differ from Llama's: a Llama's config.json (and so its
        fingerprint and its converted bytes) stays what it was before the other families came."""
        defaults = {f.name: f.default for f in fields(self) if f.name in FAMILY_PIECES}
        return {k: v for k, v in asdict(self).items() if not (k in FAMILY_PIECES and v == defaults[k])}

    @classmethod
    def from_dict(cls, data: object, where: object = "config") -> ModelConfig:
        if not isinstance(data, dict):
            raise AdainferError(where, "config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdainferError(where, f"unknown config keys {unknown} (is this a Hugging Face config.json? "
                                       "convert the folder with `python -m weights_convert SRC DST` first)")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise AdainferError(where, f"config format_version {data.get('format_version')!r} is not "
                                       f"{FORMAT_VERSION}; convert the model again")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise AdainferError(where, f"config is missing {missing}")
        try:
            config = cls(**data)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise AdainferError(where, f"bad config: {e}") from None
        return config.validate(where)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise AdainferError(path, "config.json not found")
        raw = path.read_bytes()
        if len(raw) > 1 << 20:
            raise AdainferError(path, f"config is {len(raw)} bytes; refusing anything over 1 MiB")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdainferError(path, f"malformed JSON: {e}") from None
        return cls.from_dict(data, path)


FAMILY_PIECES = ("qkv_bias", "o_bias", "qk_norm", "norm_unit_offset", "embed_scale", "activation", "sandwich_norm",
                 "attn_scale", "sliding_window", "layer_types", "rope_local_theta", "final_softcap")


def check_rope_scaling(scaling: object, where: object) -> None:
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise AdainferError(where, f"rope_scaling must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    need = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "linear": ("factor",)}
    if kind not in need:
        raise AdainferError(where, f"rope_scaling type {kind!r} is not supported (supported: llama3, linear)")
    for key in need[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise AdainferError(where, f"rope_scaling.{key} must be a positive number, got {value!r}")
    if kind == "llama3" and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise AdainferError(where, "rope_scaling needs low_freq_factor < high_freq_factor")
