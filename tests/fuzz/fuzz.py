"""Mutation fuzzing of every file adainfer reads.

Each loader is the production code path for one kind of file; its seeds are small valid files made here. Every
mutated input must either load (and pass validation) or raise AdainferError: anything else is a finding, and so is
an input that runs past the per-input time limit (a hang) or the memory cap (unbounded growth).

Each loader runs in a forked child (so a crash in native code is caught, not fatal), with its address space capped
at what it had after the imports plus --memory-mb, and a timer per input. Inputs are seeded and reproducible.

    python tests/fuzz/fuzz.py --n 10000                  # the long campaign, every loader
    python tests/fuzz/fuzz.py --n 2000 --loaders gguf    # one loader
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adainfer.errors import AdainferError  # noqa: E402

INTERESTING = [0, 1, 2, 7, 8, 255, 256, 0x7F, 0x80, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**31, 2**32, 2**40,
               2**62, 2**63, 2**63 - 1, 2**64 - 1]


# ---------------------------------------------------------------- seeds: small valid files


def tiny_config():
    from adainfer.config import ModelConfig

    return ModelConfig(arch="llama", vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                       max_seq_len=64, bos_id=256, eos_id=257, tie_embeddings=True)


def byte_tokenizer_json() -> bytes:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import byte_tokenizer

    return byte_tokenizer().to_str().encode()


def seed_safetensors(folder: Path) -> bytes:
    import torch
    from safetensors.torch import save

    from adainfer.loading import file_shapes

    g = torch.Generator().manual_seed(0)
    return save({n: torch.randn(s, generator=g) * 0.1 for n, s in file_shapes(tiny_config()).items()})


def seed_gguf(folder: Path) -> bytes:
    import gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import _bytes_to_unicode

    path = folder / "seed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 32),
                   (w.add_feed_forward_length, 64), (w.add_head_count, 4), (w.add_head_count_kv, 2)):
        add(v)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    chars = _bytes_to_unicode()
    w.add_token_list([chars[b] for b in range(256)] + ["<s>", "</s>", "<pad>", "<unk>"])
    w.add_token_types([1] * 256 + [3] * 4)
    w.add_bos_token_id(256)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (260, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
              "blk.0.attn_v.weight": (16, 32), "blk.0.attn_output.weight": (32, 32),
              "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64)}
    for name, shape in shapes.items():
        t = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 2 and name.startswith("blk.0.ffn"):
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif len(shape) == 2 and "attn_q" in name:
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q4_1),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def seed_sentencepiece(folder: Path) -> bytes:
    import sentencepiece as spm

    corpus = folder / "corpus.txt"
    lines = ["the quick brown fox jumps over the lazy dog"] * 30 + ["early exit saves layers"] * 30
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    return (folder / "sp.model").read_bytes()


def seed_classifier(folder: Path) -> bytes:
    from adainfer.exit import ExitClassifier

    clf = ExitClassifier("svm", ["gap", "top_prob"], [1.5, -0.5], -0.7, 2, 1, model={"fingerprint": "x"},
                         calibration={"task": "sst2", "shots": 5})
    return clf.to_json().encode()


def seed_crf(folder: Path) -> bytes:
    from adainfer.exit import ExitClassifier

    return ExitClassifier("crf", ["gap"], [0.0], 0.0, crf={"state_weight": [[-1.0], [1.0]], "state_bias": [0.1, 0.2],
                                                           "transitions": [[0.3, 0.1], [0.0, 0.5]]}).to_json().encode()


def seed_hf_config(folder: Path) -> bytes:
    return json.dumps({"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                       "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}).encode()


def seed_hf_config_gemma3(folder: Path) -> bytes:
    """The family with the most config pieces: per-layer-type rope, layer types, window, soft-capping."""
    return json.dumps({"model_type": "gemma3_text", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                       "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 16,
                       "sliding_window": 4, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
                       "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                       "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
                      ).encode()


def seed_shard_index(folder: Path) -> bytes:
    return json.dumps({"metadata": {"total_size": 1}, "weight_map": {"model.embed_tokens.weight": "a.safetensors",
                                                                      "model.norm.weight": "b.safetensors"}}).encode()


def seed_prompts(folder: Path) -> bytes:
    return "".join(json.dumps({"prompt": p}) + "\n" for p in ["Q: hi\nA:", "caf\u00e9 \u2603", "x" * 50]).encode()


def seed_task(folder: Path) -> bytes:
    rows = [{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1},
            {"question": "q?", "choices": ["a", "b"], "answer": 0}]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def seed_task_file(folder: Path) -> bytes:
    rows = [{"text": "a warm film", "label": "good"}, {"text": "dull", "label": 0}, {"text": "fine", "label": 1}]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# ---------------------------------------------------------------- loaders: the production code paths


def load_gguf(path: Path, work: Path):
    from adainfer.checks import read_gguf_header
    from weights_convert.gguf_file import config_from_gguf, read_gguf_tensors, tokenizer_from_gguf

    g = read_gguf_header(path)
    config = config_from_gguf(g)
    tokenizer_from_gguf(g)
    for _ in read_gguf_tensors(g, config):
        pass


def load_safetensors_model(path: Path, work: Path):
    from adainfer.loading import load_model

    folder = work / "model"
    if not folder.exists():
        folder.mkdir()
        tiny_config().save(folder / "config.json")
    os.replace(path, folder / "model.safetensors")
    load_model(folder, "float32")


def load_our_config(path: Path, work: Path):
    from adainfer.config import ModelConfig

    ModelConfig.load(path)


def load_hf_config(path: Path, work: Path):
    from weights_convert.hf import config_from_hf, read_json

    config_from_hf(read_json(path, "config.json"), path).validate(path)


def load_shard_index(path: Path, work: Path):
    from weights_convert.hf import checkpoint_files, load_hf_tensors

    folder = work / "hf"
    if not folder.exists():
        import torch
        from safetensors.torch import save_file

        folder.mkdir()
        save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, folder / "a.safetensors")
        save_file({"model.norm.weight": torch.ones(4)}, folder / "b.safetensors")
    os.replace(path, folder / "model.safetensors.index.json")
    load_hf_tensors(checkpoint_files(folder, allow_pickle=False))


def load_tokenizer_json(path: Path, work: Path):
    from adainfer.tokenizer import load_tokenizer

    folder = work / "tok"
    folder.mkdir(exist_ok=True)
    os.replace(path, folder / "tokenizer.json")
    tok = load_tokenizer(folder, tiny_config())
    tok.decode(tok.encode("hello, w\u00f6rld 42"))


def load_tokenizer_model(path: Path, work: Path):
    from adainfer.tokenizer import load_tokenizer

    folder = work / "spm"
    folder.mkdir(exist_ok=True)
    os.replace(path, folder / "tokenizer.model")
    tok = load_tokenizer(folder, tiny_config())
    tok.decode(tok.encode("hello, w\u00f6rld 42"))


def load_classifier(path: Path, work: Path):
    from adainfer.exit import ExitClassifier, ExitRule

    ExitRule(ExitClassifier.load(path))


def load_prompts(path: Path, work: Path):
    from adainfer.prompts import read_prompts

    read_prompts(path)


def load_task_rows(path: Path, work: Path):
    from adainfer.tasks import _choices

    _choices(path)


def load_task_file(path: Path, work: Path):
    from adainfer.tasks import load_task_file as load

    load(path, ["bad", "good"])


LOADERS = {  # name: (seed maker, loader, structure: "json" | "jsonl" | "binary")
    "gguf": (seed_gguf, load_gguf, "binary"),
    "safetensors": (seed_safetensors, load_safetensors_model, "binary"),
    "shard_index": (seed_shard_index, load_shard_index, "json"),
    "config": (lambda f: json.dumps(tiny_config().to_dict()).encode(), load_our_config, "json"),
    "hf_config": (seed_hf_config, load_hf_config, "json"),
    "hf_config_gemma3": (seed_hf_config_gemma3, load_hf_config, "json"),
    "tokenizer_json": (lambda f: byte_tokenizer_json(), load_tokenizer_json, "json"),
    "tokenizer_model": (seed_sentencepiece, load_tokenizer_model, "binary"),
    "classifier": (seed_classifier, load_classifier, "json"),
    "classifier_crf": (seed_crf, load_classifier, "json"),
    "prompts": (seed_prompts, load_prompts, "jsonl"),
    "task_rows": (seed_task, load_task_rows, "jsonl"),
    "task_file": (seed_task_file, load_task_file, "jsonl"),
}


# ---------------------------------------------------------------- mutators


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        op = rng.randrange(8)
        if not b:
            b = bytearray(rng.randbytes(rng.randrange(1, 64)))
            continue
        i = rng.randrange(len(b))
        if op == 0:  # bit flip
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # an interesting byte
            b[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op in (2, 3):  # an interesting 4- or 8-byte integer (counts, lengths, offsets, dims)
            width = 8 if op == 2 else 4
            v = rng.choice(INTERESTING) % (1 << (8 * width))
            b[i:i + width] = struct.pack("<Q" if width == 8 else "<I", v)
        elif op == 4:  # truncate
            del b[rng.randrange(len(b)):]
        elif op == 5:  # delete a chunk
            del b[i:i + rng.randrange(1, 64)]
        elif op == 6:  # duplicate a chunk
            j = rng.randrange(len(b))
            b[j:j] = b[i:i + rng.randrange(1, 64)]
        else:  # random bytes
            b[i:i + 8] = rng.randbytes(rng.randrange(1, 9))
    return bytes(b)


WEIRD = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1e308, -1e308, 0.5, "", "x" * 1000, "NaN",
         [], {}, [1, 2, 3], {"a": 1}, [[[[[[[[]]]]]]]], "\u0000", "\udc80"]


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return mutate_bytes(data, rng)
    for _ in range(rng.choice((1, 1, 2, 3))):
        obj = _mutate_value(obj, rng, depth=0)
    try:
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    except (ValueError, TypeError):
        return mutate_bytes(data, rng)
    if rng.random() < 0.1:
        text = text.replace("1e+308", "NaN").replace("-1e+308", "-Infinity")
    raw = text.encode("utf-8", "surrogatepass")
    return mutate_bytes(raw, rng) if rng.random() < 0.25 else raw


def _mutate_value(v, rng, depth):
    if isinstance(v, dict) and v and depth < 8 and rng.random() < 0.8:
        key = rng.choice(list(v))
        r = rng.random()
        if r < 0.15:
            v = dict(v)
            del v[key]
            return v
        if r < 0.25:
            return {**v, rng.choice(["extra", "__proto__", "weight", "dtype", key + "x"]): rng.choice(WEIRD)}
        return {**v, key: _mutate_value(v[key], rng, depth + 1)}
    if isinstance(v, list) and v and depth < 8 and rng.random() < 0.8:
        i = rng.randrange(len(v))
        r = rng.random()
        if r < 0.15:
            return v[:i] + v[i + 1:]
        if r < 0.25:
            return v + [rng.choice(WEIRD)] * rng.choice((1, 100))
        return v[:i] + [_mutate_value(v[i], rng, depth + 1)] + v[i + 1:]
    if isinstance(v, (int, float)) and not isinstance(v, bool) and rng.random() < 0.5:
        return rng.choice([v + 1, v - 1, -v, v * 1000, 0, 2**63, 1e308, float(v) + 0.5])
    return rng.choice(WEIRD)


def mutate_jsonl(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    lines[i] = mutate_json(lines[i], rng) if lines[i] else mutate_bytes(b"{}", rng)
    if rng.random() < 0.1:
        lines.insert(rng.randrange(len(lines) + 1), rng.randbytes(rng.randrange(1, 20)))
    return b"\n".join(lines)


MUTATORS = {"binary": mutate_bytes, "json": mutate_json, "jsonl": mutate_jsonl}


# ---------------------------------------------------------------- the runner


def run_loader(name: str, n: int, seed: int, time_limit: float, memory_mb: int, start: int = 0) -> dict:
    """Fuzz one loader in this process; return outcome counts and the findings."""
    make_seed, loader, kind = LOADERS[name]
    counts = {"loaded": 0, "clean_error": 0, "hang": 0, "memory": 0, "crash": 0}
    findings = []
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        work = Path(tmp)
        base = make_seed(work)
        loader_input = work / "input"
        # the seed itself must load
        loader_input.write_bytes(base)
        loader(loader_input, work)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _vm_bytes() + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        signal.signal(signal.SIGALRM, _timeout)
        try:
            for i in range(start, n):
                rng = random.Random(f"{seed}:{name}:{i}")
                data = MUTATORS[kind](base, rng)
                loader_input.write_bytes(data)
                outcome, detail = _one(loader, loader_input, work, time_limit)
                counts[outcome] += 1
                if outcome not in ("loaded", "clean_error"):
                    findings.append({"loader": name, "input": i, "outcome": outcome, "detail": detail[-800:]})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return {"loader": name, "inputs": n - start, "counts": counts, "findings": findings}


class _Hang(BaseException):
    pass


def _timeout(signum, frame):
    raise _Hang()


def _one(loader, path: Path, work: Path, time_limit: float) -> tuple[str, str]:
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        loader(path, work)
        return "loaded", ""
    except AdainferError:
        return "clean_error", ""
    except _Hang:
        return "hang", f"over {time_limit} s"
    except MemoryError:
        return "memory", "MemoryError"
    except BaseException:  # noqa: BLE001 - any other exception is a finding
        return "crash", traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_in_child(name: str, n: int, seed: int, time_limit: float, memory_mb: int) -> dict:
    """run_loader in a forked child; a child that dies (native crash) is a finding, and fuzzing resumes after it."""
    start, total = 0, {"loader": name, "inputs": n, "counts": {}, "findings": []}
    while start < n:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            try:
                out = run_loader(name, n, seed, time_limit, memory_mb, start)
                payload = json.dumps(out).encode()
            except BaseException:  # noqa: BLE001
                payload = json.dumps({"error": traceback.format_exc()}).encode()
            with os.fdopen(w, "wb") as f:
                f.write(payload)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            raw = f.read()
        _, status = os.waitpid(pid, 0)
        if raw:
            out = json.loads(raw)
            if "error" in out:
                raise RuntimeError(f"fuzzing {name} failed to start:\n{out['error']}")
            for k, v in out["counts"].items():
                total["counts"][k] = total["counts"].get(k, 0) + v
            total["findings"] += out["findings"]
            break
        # the child died mid-run: find which input, record it, go on after it
        crashed = _find_crash(name, start, n, seed, time_limit, memory_mb)
        total["findings"].append({"loader": name, "input": crashed, "outcome": "crash",
                                  "detail": f"process died (status {status})"})
        total["counts"]["crash"] = total["counts"].get("crash", 0) + 1
        start = crashed + 1
    return total


def _find_crash(name, start, n, seed, time_limit, memory_mb) -> int:
    """Replay inputs one child at a time to name the input that kills the process."""
    for i in range(start, n):
        pid = os.fork()
        if pid == 0:
            try:
                run_loader(name, i + 1, seed, time_limit, memory_mb, i)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            return i
    return n - 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="inputs per loader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    p.add_argument("--time-limit", type=float, default=2.0, help="seconds per input")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space an input may add")
    p.add_argument("--out", type=Path, help="write the outcome table as JSON")
    args = p.parse_args(argv)
    results = []
    for name in args.loaders:
        t0 = time.perf_counter()
        res = run_in_child(name, args.n, args.seed, args.time_limit, args.memory_mb)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        c = res["counts"]
        print(f"{name:16s} {args.n:6d} inputs  loaded {c.get('loaded', 0):6d}  clean error {c.get('clean_error', 0):6d}"
              f"  hang {c.get('hang', 0)}  memory {c.get('memory', 0)}  crash {c.get('crash', 0)}  "
              f"({res['seconds']} s)", flush=True)
        for f in res["findings"][:5]:
            print(f"  finding: input {f['input']}: {f['outcome']}: {f['detail'][-300:]}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
