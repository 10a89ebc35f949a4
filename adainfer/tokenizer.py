"""Text <-> token ids: `tokenizer.json` through `tokenizers`, `tokenizer.model` through `sentencepiece`."""

from __future__ import annotations

from pathlib import Path

from adainfer.config import ModelConfig
from adainfer.errors import AdainferError


class TextTokenizer:
    def __init__(self, backend, kind: str, config: ModelConfig, path: Path | None = None):
        self.backend, self.kind, self.path = backend, kind, path
        self.bos_id, self.eos_id = config.bos_id, config.eos_id
        self.add_bos = config.add_bos

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`; with `bos`, the model's BOS is prepended where the model wants one."""
        try:
            if self.kind == "tokenizers":
                ids = self.backend.encode(text, add_special_tokens=bos).ids
            else:
                ids = self.backend.encode(text)
        except Exception as e:  # a malformed tokenizer can load and still fail here (e.g. an unk token not in vocab)
            raise AdainferError(self.path or "tokenizer", f"cannot encode text: {e}") from None
        if bos and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        try:
            if self.kind == "tokenizers":
                return self.backend.decode(list(ids), skip_special_tokens=skip_special)
            return self.backend.decode(list(ids))
        except Exception as e:
            raise AdainferError(self.path or "tokenizer", f"cannot decode ids: {e}") from None

    def piece_id(self, text: str) -> int:
        """The first token of `text` encoded on its own (a label word such as " positive" or " A")."""
        ids = self.encode(text, bos=False)
        if not ids:
            raise AdainferError("--candidates", f"{text!r} encodes to no token")
        return ids[0]

    def candidate_ids(self, texts: list[str]) -> list[int]:
        """piece_id of each candidate string; refused when two share their first token (one token could not tell
        them apart)."""
        ids = [self.piece_id(t) for t in texts]
        if len(set(ids)) != len(ids):
            raise AdainferError("--candidates", f"{texts} do not start with distinct tokens, so one token cannot tell "
                                                "them apart")
        return ids


def load_tokenizer(folder: Path, config: ModelConfig) -> TextTokenizer | None:
    """The tokenizer of a converted model folder, or None if it has none."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise AdainferError(path, f"cannot load tokenizer: {e}") from None
        return TextTokenizer(backend, "tokenizers", config, path)
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm

        path = folder / "tokenizer.model"
        try:
            backend = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise AdainferError(path, f"cannot load tokenizer: {e}") from None
        return TextTokenizer(backend, "sentencepiece", config, path)
    return None
