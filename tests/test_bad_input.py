"""Bad input, as a user meets it on the command line: one clear message naming the file or argument, exit code 2,
no traceback, and nothing written."""

import json
import shutil

import pytest
import torch
from helpers import run_cli
from safetensors.torch import save_file
from test_gguf import write_gguf
from tiny import hf_model, save_hf


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf(hf_model("llama-mha", seed=7), tmp_path_factory.mktemp("hf") / "llama")


def copy_of(folder, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(folder, dst)
    return dst


def convert_fails(src, tmp_path, *needles, extra=()):
    dst = tmp_path / "out"
    proc = run_cli("weights_convert", src, dst, "--quiet", *extra)
    assert_clean_error(proc, *needles)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary folder left behind"


def test_missing_config(hf_folder, tmp_path):
    src = copy_of(hf_folder, tmp_path)
    (src / "config.json").unlink()
    convert_fails(src, tmp_path, str(src / "config.json"), "not found")


def test_malformed_config(hf_folder, tmp_path):
    src = copy_of(hf_folder, tmp_path)
    (src / "config.json").write_text('{"model_type": "llama", ')
    convert_fails(src, tmp_path, "config.json", "malformed JSON")


def test_unknown_architecture(hf_folder, tmp_path):
    src = copy_of(hf_folder, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(cfg))
    convert_fails(src, tmp_path, "config.json", "unknown architecture", "gpt_neox")


def test_tensor_of_wrong_shape(hf_folder, tmp_path):
    src = copy_of(hf_folder, tmp_path)
    state = hf_model("llama-mha", seed=7).state_dict()
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(127, 64)
    save_file({k: v.contiguous() for k, v in state.items()}, src / "model.safetensors")
    convert_fails(src, tmp_path, "layers.1.feed_forward.w3.weight", "shape")


def test_truncated_safetensors(hf_folder, tmp_path):
    src = copy_of(hf_folder, tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    convert_fails(src, tmp_path, str(f), "truncated")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model("llama-mha", seed=8), path, "Q8_0")
    path.write_bytes(path.read_bytes()[:-1000])
    convert_fails(path, tmp_path, str(path), "truncated")


def test_pickle_without_permission(hf_folder, tmp_path):
    src = copy_of(hf_folder, tmp_path)
    (src / "model.safetensors").unlink()
    torch.save(hf_model("llama-mha", seed=7).state_dict(), src / "pytorch_model.bin")
    convert_fails(src, tmp_path, "pytorch_model.bin", "--allow-pickle")


def test_existing_destination_without_force(hf_folder, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    proc = run_cli("weights_convert", hf_folder, dst, "--quiet")
    assert_clean_error(proc, str(dst), "--force")
    assert [p.name for p in dst.iterdir()] == ["mine.txt"]
    proc = run_cli("weights_convert", hf_folder, dst, "--quiet", "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_missing_source(tmp_path):
    convert_fails(tmp_path / "nowhere", tmp_path, "nowhere", "no such file")


# ---------------------------------------------------------------- run


def test_run_empty_prompt(tiny_model):
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--prompt", ""), "--prompt", "empty prompt")


def test_run_prompt_longer_than_context(tiny_model):
    proc = run_cli("adainfer.run", "--model", tiny_model, "--prompt", "x" * 300)
    assert_clean_error(proc, "--prompt", "300 tokens", "context of 256")


def test_run_missing_model_folder(tmp_path):
    proc = run_cli("adainfer.run", "--model", tmp_path / "nope", "--prompt", "hi")
    assert_clean_error(proc, str(tmp_path / "nope"), "no such model folder")


def test_run_truncated_weights(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_clean_error(run_cli("adainfer.run", "--model", folder, "--prompt", "hi"), str(f), "truncated")


def test_run_bad_arguments(tiny_model):
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--batch-size", "0"), "--batch-size")
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--dtype", "float8"), "--dtype", "float8")
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--max-new-tokens", "0"), "--max-new-tokens")
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--sync-every", "0"), "--sync-every")
    if not torch.cuda.is_available():
        assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--capture-checks"), "--capture-checks",
                           "needs --device cuda")
        assert_clean_error(run_cli("adainfer.eval", "--model", tiny_model, "--task", "sst2", "--capture-checks",
                                   "--out", "x.json"), "--capture-checks", "needs --device cuda")
        assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--prefill", "captured"), "--prefill",
                           "needs --device cuda")
        assert_clean_error(run_cli("adainfer.calibrate", "--model", tiny_model, "--prefill", "captured", "--prompts",
                                   "p.jsonl", "--out", "c.json"), "--prefill", "needs --device cuda")


def test_run_bad_prompt_lines(tiny_model, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b'{"prompt": "fine"}\n\n{"prompt": "also fine"}\n{"prompt": "broken"\n')
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--prompts", f), f"{f}:4", "malformed JSON")
    f.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--prompts", f), f"{f}:2", "UTF-8")
    f.write_bytes(b'{"prompt": "fine"}\n{"prompt": ""}\n')
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--prompts", f), f"{f}:2", "empty prompt")
    f.write_bytes(b'{"text": "wrong key"}\n')
    assert_clean_error(run_cli("adainfer.run", "--model", tiny_model, "--prompts", f), f"{f}:1", '"prompt"')


def test_run_truncate_when_asked(tiny_model):
    proc = run_cli("adainfer.run", "--model", tiny_model, "--prompt", "x" * 290 + "END", "--truncate", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["truncated_tokens"] == 293 - 256 and r["token_ids"]
