"""Load a converted model folder: build the decoder on the meta device, check and assign the weights.

Our model.safetensors keeps q, k and v as three tensors, as checkpoints do; the decoder holds them as one matrix.
FUSED is the one place where the file's names and the modules' names differ: `file_shapes` (the file format, derived
from the decoder itself) splits by it, loading concatenates by it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from adainfer.checks import check_safetensors
from adainfer.config import ModelConfig
from adainfer.errors import AdainferError
from adainfer.model import Decoder, rope_inv_freq
from adainfer.parallel import Shard, make_shard, split_of
from adainfer.quant import cpu_dtype
from adainfer.tokenizer import TextTokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """'auto': bfloat16 on a GPU; on a CPU the faster of bfloat16 and float32 there (quant.cpu_dtype: by the CPU's
    flags, or where they do not say, measured once and kept in the cache, adainfer.default_model.cache_root)."""
    check_dtype(name)
    if name != "auto":
        return DTYPES[name]
    if str(device).startswith("cuda"):
        return torch.bfloat16
    from adainfer.default_model import cache_root

    return cpu_dtype(cache_root())


def check_dtype(name: str) -> None:
    """Refuse a dtype name other than auto and DTYPES' (without measuring anything)."""
    if name != "auto" and name not in DTYPES:
        raise AdainferError("--dtype", f"unknown dtype {name!r} (choose auto, {', '.join(DTYPES)})")


def load_model(folder: Path | str, dtype: str | torch.dtype = "auto", device: str = "cpu", world=None,
               ) -> tuple[Decoder, TextTokenizer | None]:
    """(decoder in eval mode, tokenizer or None) from a folder written by weights_convert. With a `world`
    (adainfer.distributed.World) of tensor-parallel replicas, this rank's slice (adainfer.parallel), reading only its
    slices of the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdainferError(folder, "no such model folder")
    config = ModelConfig.load(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise AdainferError(weights, "model.safetensors not found")
    infos = check_safetensors(weights)
    shard = None if world is None else make_shard(world, config)
    expected = file_shapes(config)
    for name, shape in expected.items():
        if name not in infos:
            raise AdainferError(weights, f"tensor {name} is missing")
        if infos[name].shape != shape:
            raise AdainferError(weights, f"tensor {name} has shape {list(infos[name].shape)}, "
                                         f"config.json needs {list(shape)}")
        if infos[name].dtype not in ("F32", "BF16", "F16"):
            raise AdainferError(weights, f"tensor {name} has dtype {infos[name].dtype}, expected F32/BF16/F16")
    extra = sorted(set(infos) - set(expected))
    if extra:
        raise AdainferError(weights, f"unexpected tensors {extra[:5]}")

    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    try:
        with safe_open(weights, framework="pt") as f:
            disk = {name: read_slice(f, name, config, shard) for name in expected}
            # The fingerprint reads sampled values of every tensor: a rank holding slices reads those elements only.
            fprint = fingerprint(config, disk if shard is None else _Sampled(f, expected))
    except Exception as e:
        raise AdainferError(weights, f"cannot read tensors: {e}") from None
    for name, t in disk.items():
        if not bool(torch.isfinite(t).all()):
            raise AdainferError(weights, f"tensor {name} holds inf or NaN values")
    with torch.device("meta"):
        model = Decoder(config, shard)
    model.load_state_dict(fuse_state(disk, config, dtype, device), strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device) if config.rotary else torch.zeros(0, device=device)
    if config.rope_local_theta is not None:
        model.inv_freq_local = rope_inv_freq(config, local=True).to(device)
    model.embed_mult = float(torch.tensor(config.embed_scale, dtype=dtype))  # Gemma multiplies in its dtype
    model.eval().requires_grad_(False)
    model.fingerprint = fprint
    return model, load_tokenizer(folder, config)


def folder_fingerprint(folder: Path | str) -> str:
    """The fingerprint of a converted model folder without building the model (tensors read one at a time)."""
    folder = Path(folder)
    config = ModelConfig.load(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise AdainferError(weights, "model.safetensors not found")
    names = sorted(check_safetensors(weights))
    try:
        with safe_open(weights, framework="pt") as f:
            return fingerprint(config, _LazyTensors(f, names))
    except Exception as e:
        raise AdainferError(weights, f"cannot read tensors: {e}") from None


def read_slice(f, name: str, config: ModelConfig, shard: Shard | None) -> torch.Tensor:
    """Tensor `name` of an open safetensors file, or this rank's slice of it (adainfer.parallel.SPLIT)."""
    how = None if shard is None else split_of(name)
    if how is None:
        return f.get_tensor(name)
    dim, unit = how
    start, end = shard.span(config, unit)
    part = f.get_slice(name)
    return part[start:end] if dim == 0 else part[:, start:end]


class _Sampled(Mapping):
    """name -> an object that gives fingerprint() the elements it samples of that tensor, reading only those rows."""

    def __init__(self, f, shapes: dict[str, tuple[int, ...]]):
        self.f, self.shapes = f, shapes

    def __getitem__(self, name: str):
        return _SampledTensor(self.f.get_slice(name), self.shapes[name])

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class _SampledTensor:
    def __init__(self, part, shape: tuple[int, ...]):
        self.part, self.shape = part, torch.Size(shape)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Elements `idx` of the flattened tensor."""
        if len(self.shape) == 1:
            return self.part[:][idx]
        cols = int(torch.Size(self.shape[1:]).numel())
        rows = (idx // cols).tolist()
        return torch.stack([self.part[r:r + 1].reshape(-1)[i % cols] for r, i in zip(rows, idx.tolist())])


class _LazyTensors(Mapping):
    """name -> tensor, read from an open safetensors file when asked for (one tensor in memory at a time)."""

    def __init__(self, f, names: list[str]):
        self.f, self.names = f, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.f.get_tensor(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# The one place where the file's names and the modules' names differ: the file keeps q, k and v apart, and gate and
# up, as checkpoints do (suffixes .weight and .bias alike); the modules hold each group as the row blocks of one
# matrix, in this order (a Linear's `parts`: the rows of each). OPT's MLP has a w1 and no w3: nothing to fuse there.
FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def file_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of our model.safetensors, by name, with its shape: the decoder's own state dict (built on the
    meta device), its fused matrices split by FUSED."""
    with torch.device("meta"):
        model = Decoder(config)
    shapes = {}
    for name, t in model.state_dict().items():
        fused = next((f for f in FUSED if f".{f}." in f".{name}"), None)
        if fused is None:
            shapes[name] = tuple(t.shape)
            continue
        prefix, suffix = name.split(fused)
        for part, rows in zip(FUSED[fused], model.get_submodule(prefix + fused).parts):
            shapes[prefix + part + suffix] = (rows, *t.shape[1:])
    return shapes


def fuse_state(disk: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype, device) -> dict:
    """Our file's tensors -> the decoder's state dict (FUSED's parts concatenated where the file has them all),
    cast to dtype."""
    state = dict(disk)
    for fused, parts in FUSED.items():
        for name in [n for n in disk if f".{parts[0]}." in f".{n}"]:
            prefix, suffix = name.split(parts[0])
            names = [prefix + p + suffix for p in parts]
            if all(n in state for n in names):
                state[prefix + fused + suffix] = torch.cat([state.pop(n) for n in names])
    return {name: t.to(device=device, dtype=dtype).contiguous() for name, t in state.items()}


def fingerprint(config: ModelConfig, tensors: Mapping[str, torch.Tensor], samples: int = 256) -> str:
    """What a classifier was fitted for: the model, not the file. sha256 of the config's numbers (not its `name`
    or `format_version`) and, for every tensor in name order, its name, its shape and `samples` evenly spaced values
    rounded to bfloat16. Header metadata, tensor order in the file and the library versions that wrote it do not
    enter; a float32 and a bfloat16 conversion of the same weights share a fingerprint (they round to the same
    bfloat16 values), so a classifier holds for both."""
    h = hashlib.sha256()
    cfg = config.fingerprint_dict()
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        n = t.shape.numel()
        k = min(samples, n)
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)  # first and last element included
        picked = t.take(idx) if isinstance(t, _SampledTensor) else t.detach().reshape(-1)[idx]
        values = picked.float().to(torch.bfloat16).view(torch.int16).cpu().numpy()
        h.update(f"{name}:{list(tensors[name].shape)}:".encode())
        h.update(values.astype("<i2").tobytes())
    return h.hexdigest()[:16]
