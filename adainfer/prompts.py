"""Reading prompt files: one JSON object a line, {"prompt": str}. Errors name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from adainfer.errors import AdainferError

MAX_FILE = 1 << 30


def read_jsonl(path: Path, what: str = "line") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is an AdainferError naming it."""
    path = Path(path)
    if not path.is_file():
        raise AdainferError(path, "file not found")
    if path.stat().st_size > MAX_FILE:
        raise AdainferError(path, f"larger than {MAX_FILE} bytes")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise AdainferError(f"{path}:{n}", f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise AdainferError(f"{path}:{n}", f"malformed JSON: {msg}") from None
            if not isinstance(obj, dict):
                raise AdainferError(f"{path}:{n}", f"each {what} must be a JSON object")
            rows.append((n, obj))
    return rows


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(where, prompt) pairs from a prompts file; `where` is "FILE:LINE" for error messages."""
    out = []
    for n, obj in read_jsonl(path, "line"):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise AdainferError(f"{path}:{n}", 'expected {"prompt": "..."} with a string prompt')
        out.append((f"{path}:{n}", prompt))
    if not out:
        raise AdainferError(path, "no prompts in file")
    return out
