"""Our decoder against transformers on the same random-init weights, through the real converter.

Tolerances: float32 hidden states and logits max abs diff <= 1e-4; bfloat16 top-1 equal wherever the float32
top-2 logit margin exceeds 0.1 (closer calls may legitimately flip under bfloat16 rounding).
"""

import json

import pytest
import torch
from tiny import PRESETS, VOCAB, hf_model, make_converted, save_hf

from adainfer.exit import Plan
from adainfer.loading import load_model
from weights_convert import convert

PROMPTS = [torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 7, 33, 90)]


def hf_outputs(hf, ids):
    with torch.no_grad():
        return hf(ids, output_hidden_states=True)


def assert_parity(hf, model, ids, atol=1e-4):
    ref = hf_outputs(hf, ids)
    ours = model(ids, plan=Plan(hidden_states=True))
    hs = ours.hidden_states
    assert len(hs) == len(ref.hidden_states) == model.config.n_layers + 1
    for i in range(len(hs) - 1):  # embeddings and every block but the last
        diff = (hs[i] - ref.hidden_states[i]).abs().max().item()
        assert diff <= atol, f"hidden state {i}: max abs diff {diff}"
    # transformers' last hidden state has the final norm (and OPT-350m's project_out) applied
    diff = (model.head_input(hs[-1]) - ref.hidden_states[-1]).abs().max().item()
    assert diff <= atol, f"last hidden state: max abs diff {diff}"
    diff = (model.logits(hs[-1]) - ref.logits).abs().max().item()
    assert diff <= atol, f"logits: max abs diff {diff}"
    diff = (ours.logits - ref.logits[:, -1]).abs().max().item()
    assert diff <= atol, f"last-token logits from the loop: max abs diff {diff}"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_float32_parity(converted, preset):
    hf, folder = converted(preset)
    model, _ = load_model(folder, "float32")
    for ids in PROMPTS:
        assert_parity(hf, model, ids)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_bfloat16_top1(converted, preset):
    hf, folder = converted(preset)
    model, _ = load_model(folder, "bfloat16")
    checked = 0
    for ids in PROMPTS:
        ref = hf_outputs(hf, ids).logits[0]  # (T, V) float32
        ours = model.logits(model(ids, plan=Plan(hidden_states=True)).hidden_states[-1])[0].float()
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1
        assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
        checked += int(clear.sum())
    assert checked >= 50, "too few positions with a clear top-1 to say anything"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gate_and_up_as_one_product_or_two(converted, dtype, monkeypatch):
    """The MLP's gate and up are one matrix (w13, the file's w1 and w3 stacked). In float32 on a CPU they run as two
    products of its row blocks, elsewhere as one (GatedMLP.SPLIT, model.gate_up_split). Either way, every hidden
    state agrees: float32 within 1e-5, bfloat16 within one ulp of the states' scale."""
    import adainfer.quant as quant
    from adainfer.model import GatedMLP, gate_up_split

    hf, folder = converted("llama-gqa-tied")
    model, _ = load_model(folder, dtype)
    w13 = model.layers[1].feed_forward.w13.weight
    w1, w3 = hf.model.layers[1].mlp.gate_proj.weight, hf.model.layers[1].mlp.up_proj.weight
    assert torch.equal(w13.float(), torch.cat([w1, w3]).to(w13.dtype).float())  # gate rows, then up rows
    x = torch.zeros(1, 5, 64, dtype=w13.dtype)
    monkeypatch.setattr(quant, "UPCAST_ROWS", 0)  # a CPU with bfloat16 units
    assert gate_up_split(x) == (dtype == "float32")
    monkeypatch.setattr(quant, "UPCAST_ROWS", 8)  # AVX2: 8 rows and more upcast to float32, then split
    assert gate_up_split(x) == (dtype == "float32") and gate_up_split(x.expand(2, 5, 64)) is True
    ids = PROMPTS[2]
    states = {}
    for split in (True, False):
        monkeypatch.setattr(GatedMLP, "SPLIT", split)
        states[split] = torch.stack(model(ids, plan=Plan(hidden_states=True)).hidden_states).float()
    diff = (states[True] - states[False]).abs().max().item()
    # (measured 0.0 in both dtypes on an AVX512 Xeon; bfloat16 allowed one ulp at the states' largest magnitude)
    assert diff <= (1e-5 if dtype == "float32" else 2 ** -7 * states[True].abs().max().item()), diff


def test_rope_scaling_is_applied(converted):
    _, folder = converted("llama-rope-scaling")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0
    model, _ = load_model(folder, "float32")
    plain = torch.tensor(1.0) / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert not torch.allclose(model.inv_freq, plain), "llama3 scaling left the frequencies unchanged"


@pytest.mark.parametrize("preset", ["llama-gqa-tied", "opt-350m-like"])
def test_sharded_safetensors(tmp_path, preset):
    hf = hf_model(preset, seed=3)
    src = save_hf(hf, tmp_path / "hf", shard="40KB")
    assert (src / "model.safetensors.index.json").exists() and len(list(src.glob("*.safetensors"))) > 2
    convert(src, tmp_path / "ours", progress=False)
    model, _ = load_model(tmp_path / "ours", "float32")
    assert_parity(hf, model, PROMPTS[2])


def test_pickle_checkpoint_with_permission(tmp_path):
    hf = hf_model("opt-125m-like", seed=4)
    src = save_hf(hf, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    # Original facebook/opt checkpoints name tensors "decoder.*" (no "model." prefix); the converter takes both.
    state = {k[len("model."):] if k.startswith("model.decoder.") else k: v for k, v in hf.state_dict().items()}
    torch.save(state, src / "pytorch_model.bin")
    convert(src, tmp_path / "ours", allow_pickle=True, progress=False)
    model, _ = load_model(tmp_path / "ours", "float32")
    assert_parity(hf, model, PROMPTS[1])


def test_converted_dtype_option(tmp_path):
    hf, folder = make_converted("llama-mha", tmp_path, seed=5, dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("tok_embeddings.weight").dtype == torch.bfloat16
    assert VOCAB == json.loads((folder / "config.json").read_text())["vocab_size"]
