"""Hugging Face folders and GGUF files -> an adainfer model folder (config.json, model.safetensors, tokenizer).

    python -m weights_convert SRC DST [--dtype auto|float32|bfloat16|float16] [--force] [--allow-pickle]

The folder is written beside DST under a temporary name and renamed into place, so DST is always either absent,
the old complete folder, or the new complete one.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from adainfer.config import ModelConfig
from adainfer.errors import AdainferError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def convert(src: Path, dst: Path, dtype: str = "auto", force: bool = False, allow_pickle: bool = False,
            progress: bool = True) -> ModelConfig:
    """Convert SRC (a Hugging Face folder or a .gguf file) into the adainfer folder DST; return its config."""
    src, dst = Path(src), Path(dst)
    if dtype != "auto" and dtype not in DTYPES:
        raise AdainferError("--dtype", f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    if not src.exists():
        raise AdainferError(src, "no such file or folder")
    if dst.exists() and not force:
        raise AdainferError(dst, "already exists; pass --force to replace it")
    if src.is_dir():
        config, tensors, write_tokenizer = _from_hf(src, allow_pickle)
    else:
        config, tensors, write_tokenizer = _from_gguf(src, progress)
    _check_tensors(config, tensors, src)
    if dtype == "auto":
        dtype = _most_common_float(tensors)
    tensors = {name: t.to(DTYPES[dtype]).contiguous() for name, t in tensors.items()}

    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config.save(tmp / "config.json")
        # One metadata key: safetensors writes __metadata__ in a Rust HashMap's random order, so two keys made every
        # save one of two files (measured: 23 vs 11 of 34 conversions, in every safetensors version 0.4.0-0.8.0).
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        write_tokenizer(tmp)
        _fsync_dir_files(tmp)
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def _from_hf(src: Path, allow_pickle: bool):
    from weights_convert.hf import checkpoint_files, config_from_hf, load_hf_tensors, read_json, rename_hf_tensors

    config_path = src / "config.json"
    config = config_from_hf(read_json(config_path, "config.json"), config_path)
    tok_config = src / "tokenizer_config.json"
    if tok_config.is_file():
        add_bos = read_json(tok_config, "tokenizer_config.json").get("add_bos_token")
        if isinstance(add_bos, bool):
            config.add_bos = add_bos and config.bos_id is not None
    config.validate(config_path)
    files = checkpoint_files(src, allow_pickle)
    tensors = rename_hf_tensors(load_hf_tensors(files), config, src)

    def write_tokenizer(out: Path):
        copied = False
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
                copied = True
        if not (src / "tokenizer.json").is_file() and (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
            _byte_level_from_vocab_merges(src).save(str(out / "tokenizer.json"))
            copied = True
        if copied:
            from adainfer.tokenizer import load_tokenizer

            load_tokenizer(out, config)  # fail now, not at the first run, on a tokenizer file we cannot read
        else:
            print(f"warning: {src} has no tokenizer files; the converted model will need token ids",
                  file=sys.stderr)

    return config, tensors, write_tokenizer


def _from_gguf(src: Path, progress: bool):
    from tqdm import tqdm

    from adainfer.checks import read_gguf_header
    from weights_convert.gguf_file import config_from_gguf, read_gguf_tensors, tokenizer_from_gguf

    g = read_gguf_header(src)
    config = config_from_gguf(g)
    tokenizer = tokenizer_from_gguf(g)
    with tqdm(total=len(g.tensors), desc=f"converting {src.name}", unit="tensor", disable=not progress,
              file=sys.stderr) as bar:
        tensors = dict(read_gguf_tensors(g, config, bar))

    def write_tokenizer(out: Path):
        tokenizer.save(str(out / "tokenizer.json"))

    return config, tensors, write_tokenizer


def _byte_level_from_vocab_merges(src: Path):
    """GPT-2 / OPT folders ship vocab.json + merges.txt; build the equivalent tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        model = models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt"))
    except Exception as e:
        raise AdainferError(src / "vocab.json", f"cannot build a tokenizer from vocab.json + merges.txt: {e}") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _check_tensors(config: ModelConfig, tensors: dict, src: Path) -> None:
    from adainfer.loading import file_shapes

    expected = file_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise AdainferError(src, f"missing tensors for this config: {missing[:5]}"
                                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise AdainferError(src, f"unexpected tensors for this config: {extra[:5]}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise AdainferError(src, f"tensor {name} has shape {list(t.shape)}, the config needs {list(shape)}")
        if not t.is_floating_point():
            raise AdainferError(src, f"tensor {name} has dtype {t.dtype}, expected a floating-point type")
        if not bool(torch.isfinite(t).all()):
            raise AdainferError(src, f"tensor {name} holds inf or NaN values")


def _most_common_float(tensors: dict) -> str:
    names = {v: k for k, v in DTYPES.items()}
    counts = Counter(names.get(t.dtype, "float32") for t in tensors.values())
    return counts.most_common(1)[0][0]


# ---------------------------------------------------------------- writing that cannot half-happen


def publish_dir(tmp: Path, dst: Path) -> None:
    """Move the complete folder `tmp` to `dst`, replacing what is there without a moment of a partial `dst`."""
    if not dst.exists():
        try:
            os.rename(tmp, dst)
            return
        except OSError:
            if not dst.exists():
                raise
    if _exchange(tmp, dst):  # atomic swap; tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)  # between these two renames dst is briefly absent, never partial
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swap two paths atomically. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def clean_stale_temps(dst: Path) -> None:
    """Remove temporary folders that a killed conversion into `dst` left behind (their process is gone)."""
    for stale in dst.parent.glob(f".{dst.name}.*-*-*"):
        kind = stale.name[len(dst.name) + 2:].split("-")
        if len(kind) < 3 or kind[0] not in ("tmp", "old") or not kind[1].isdigit():
            continue
        if _alive(int(kind[1])):
            continue
        if kind[0] == "old" and not dst.exists():
            os.rename(stale, dst)  # killed between the two renames of publish_dir's fallback: restore
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir_files(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
