"""tokenizer.json goes through `tokenizers`, tokenizer.model through `sentencepiece`; both survive conversion."""

import json

import sentencepiece as spm
from tiny import byte_tokenizer, hf_model, save_hf

from adainfer.loading import load_model
from weights_convert import convert

TEXT = "The quick brown fox jumps over the lazy dog. Early exit saves layers; the answer stays the same."


def test_sentencepiece_tokenizer_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([TEXT] * 20 + ["hello world", "adaptive inference with fewer layers"] * 10))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    src = save_hf(hf_model("llama-mha", seed=12), tmp_path / "hf")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["bos_token_id"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "ours", progress=False)
    model, tok = load_model(tmp_path / "ours", "float32")
    assert tok.kind == "sentencepiece"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.encode(TEXT) == [1] + sp.encode(TEXT)  # BOS from tokenizer_config.json's add_bos_token
    assert tok.encode(TEXT, bos=False) == sp.encode(TEXT)
    assert tok.decode(sp.encode(TEXT)) == TEXT


def test_tokenizer_json_round_trip(converted):
    _, folder = converted("opt-125m-like")
    model, tok = load_model(folder, "float32")
    assert tok.kind == "tokenizers"
    ids = tok.encode("héllo, wörld")
    assert ids == byte_tokenizer().encode("héllo, wörld").ids and tok.decode(ids) == "héllo, wörld"


def test_tokenizer_that_loads_but_cannot_encode_is_a_clean_error(tmp_path):
    # Found by the fuzz campaign: a tokenizer.json whose unk token is not in its vocabulary loads, then raises a
    # bare Exception from `tokenizers` on the first unknown character.
    import pytest
    from tokenizers import Tokenizer, models

    from adainfer.config import ModelConfig
    from adainfer.errors import AdainferError
    from adainfer.tokenizer import load_tokenizer

    Tokenizer(models.BPE(vocab={"a": 0}, merges=[], unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    config = ModelConfig(arch="llama", vocab_size=4, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=8,
                         max_seq_len=8)
    tok = load_tokenizer(tmp_path, config)
    with pytest.raises(AdainferError, match="tokenizer.json.*cannot encode"):
        tok.encode("ab")
