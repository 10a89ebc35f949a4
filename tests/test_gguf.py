"""GGUF conversion: tiny Llama GGUFs written like llama.cpp's converter (q/k rows permuted, quantized blocks).

Two checks. The converter's tensors equal, exactly, a dequantization written here from the GGML block layouts and
the file's raw bytes: the converter and transformers (gguf_file=) both dequantize with the gguf package, so their
agreement alone could not catch a mistake there. And the converted model's logits agree with transformers' on the
same file (<= 1e-4): the header, the tokenizer, the q/k un-permutation and the forward pass."""

import numpy as np
import pytest
import torch
from tiny import _bytes_to_unicode, hf_model

from adainfer.loading import load_model
from weights_convert import convert

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q and k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path, qtype_name: str):
    import gguf

    c = hf.config
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    chars = _bytes_to_unicode()
    tokens = [chars[b] for b in range(256)] + ["<s>", "</s>", "<pad>", "<unk>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * 4)
    w.add_token_scores([0.0] * len(tokens))  # no merges: every byte is a token already
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    for name, t in hf.state_dict().items():
        t = t.float().numpy()
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{layer}.{HF_TO_GGUF[rest]}"
        else:
            gname = HF_TO_GGUF[name]
        if gname.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, c.num_key_value_heads)
        if t.ndim == 1 or qtype_name == "F32":
            w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
        elif qtype_name == "F16":
            w.add_tensor(gname, t.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# GGML's block layouts (ggml-common.h): 32 elements a block, little-endian, an f16 scale d first.
BLOCKS = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),  # x = d * q
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", 16)]),  # x = d * (q - 8)
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),  # x = d * q + m
}

GGUF_TO_OURS = {  # our names, written out here rather than taken from the converter's map
    "token_embd": "tok_embeddings",
    "output_norm": "norm",
    "output": "output",
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}


def dequantize_raw(raw: bytes, qtype: str, shape: tuple) -> np.ndarray:
    """Float32 values of a tensor's raw bytes, read from the block layouts (not with gguf.quants)."""
    if qtype in ("F32", "F16"):
        return np.frombuffer(raw, "<f4" if qtype == "F32" else "<f2").astype(np.float32).reshape(shape)
    blocks = np.frombuffer(raw, BLOCKS[qtype])
    d = blocks["d"].astype(np.float32)[:, None]
    if qtype == "Q8_0":
        return (d * blocks["qs"].astype(np.float32)).reshape(shape)
    # byte j of a block holds element j in its low nibble and element j + 16 in its high nibble
    q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32)  # (blocks, 32)
    x = d * (q - 8) if qtype == "Q4_0" else d * q + blocks["m"].astype(np.float32)[:, None]
    return x.reshape(shape)


@pytest.mark.parametrize("preset", ["llama-mha", "llama-gqa-tied"])  # 4 kv heads, then 2 (k permuted per kv head)
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_converted_tensors_equal_an_independent_dequantization(tmp_path, preset, qtype):
    import gguf
    from safetensors.numpy import load_file

    hf = hf_model(preset, seed=11)
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(hf, path, qtype)
    convert(path, tmp_path / "ours", progress=False)
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    heads = {"attn_q": hf.config.num_attention_heads, "attn_k": hf.config.num_key_value_heads}
    seen = set()
    for t in gguf.GGUFReader(path).tensors:
        stored = "F32" if len(t.shape) == 1 else qtype  # write_gguf keeps the norms in F32
        assert t.tensor_type.name == stored, t.name
        raw = np.fromfile(path, np.uint8, count=t.n_bytes, offset=t.data_offset).tobytes()
        want = dequantize_raw(raw, stored, tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dims innermost first
        parts = t.name.split(".")  # blk.{i}.{kind}.weight or {kind}.weight
        kind = parts[-2]
        name = f"{GGUF_TO_OURS[kind]}.weight" if parts[0] != "blk" else f"layers.{parts[1]}.{GGUF_TO_OURS[kind]}.weight"
        got = ours[name]
        if kind in heads:  # the converter un-permuted llama.cpp's interleaved q/k rows: permute them back
            got = llama_cpp_permute(got, heads[kind])
        assert got.dtype == np.float32 and np.array_equal(got, want), t.name
        seen.add(name)
    assert seen == set(ours)


@pytest.fixture(scope="module")
def tiny_llama():
    return hf_model("llama-mha", seed=11)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_transformers(tmp_path, tiny_llama, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(tiny_llama, path, qtype)
    convert(path, tmp_path / "ours", progress=False)
    ours, tok = load_model(tmp_path / "ours", "float32")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits[0, -1]
    assert (ours(ids).logits[0] - want).abs().max() <= 1e-4
    if qtype == "F32":  # lossless: equal to the original transformers model too
        with torch.no_grad():
            orig = tiny_llama(ids).logits[0, -1]
        assert (ours(ids).logits[0] - orig).abs().max() <= 1e-4
        hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        text = "GGUF tokenizers: byte-level, ünïcödé, 42!"
        assert tok.encode(text) == hf_tok(text).input_ids
