"""The paper's tasks read from jsonl files (the layout of ../shared/data), and their few-shot prompts.

Prompt template (AdaInfer §5.1): `Q: {x}\\nA: {y}\\n\\n` for each of k demonstrations, then `Q: {x}\\nA:`; the
prediction is the next token, compared with the first token of " " + answer. Demonstrations come from the task's
train split with a fixed seed and never include the evaluated row.

Splits: SST-2 train/dev, AG News train/test, MMLU dev/test. CommonsenseQA and SQuAD ship a dev split only: rows
whose index is a multiple of 3 form the train (demonstration and calibration) pool, the others are evaluated.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from adainfer.errors import AdainferError
from adainfer.prompts import read_jsonl

TASKS = ("sst2", "agnews", "mmlu", "csqa", "squad")
LETTERS = "ABCDEFGH"
TEMPLATES = {
    "qa": "Q: {x}\nA: {y}\n\n",  # the paper's
    "review": "Review: {x}\nSentiment: {y}\n\n",
}


@dataclass
class Example:
    x: str  # what fills {x}
    y: str  # the answer text that fills {y} in a demonstration
    answers: list[str] = field(default_factory=list)  # every accepted answer (SQuAD has several)
    label: int | None = None  # class or choice index, when there is one


@dataclass
class Task:
    name: str
    train: list[Example]  # demonstrations and calibration prompts come from here
    eval: list[Example]
    labels: list[str] | None  # the closed answer set (label words or option letters), else None


def default_data_dir() -> Path:
    import os

    env = os.environ.get("ADAINFER_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_task(name: str, data_dir: Path | None = None) -> Task:
    if name not in TASKS:
        raise AdainferError("--task", f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    root = Path(data_dir or default_data_dir()) / name
    if not root.is_dir():
        raise AdainferError(root, "task data folder not found (pass --data DIR, the layout of shared/data)")
    if name == "sst2":
        labels = ["negative", "positive"]
        return Task(name, _classification(root / "train.jsonl", labels), _classification(root / "dev.jsonl", labels),
                    labels)
    if name == "agnews":
        labels = _labels(root / "labels.json")
        return Task(name, _classification(root / "train.jsonl", labels),
                    _classification(root / "test.jsonl", labels), labels)
    if name == "mmlu":
        return Task(name, _choices(root / "dev.jsonl"), _choices(root / "test.jsonl"), list(LETTERS[:4]))
    if name == "csqa":
        rows = _choices(root / "dev.jsonl")
        return Task(name, rows[0::3], [r for i, r in enumerate(rows) if i % 3], list(LETTERS[:5]))
    rows = _squad(root / "dev.jsonl")
    return Task(name, rows[0::3], [r for i, r in enumerate(rows) if i % 3], None)


def _labels(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdainferError(path, f"cannot read label names: {e}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise AdainferError(path, "expected a JSON list of label names")
    return labels


def _classification(path: Path, labels: list[str]) -> list[Example]:
    out = []
    for n, row in read_jsonl(path, "row"):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not isinstance(label, int) or not 0 <= label < len(labels):
            raise AdainferError(f"{path}:{n}", f'expected {{"text": str, "label": 0..{len(labels) - 1}}}')
        out.append(Example(text, labels[label], [labels[label]], label))
    return out


def _choices(path: Path) -> list[Example]:
    out = []
    for n, row in read_jsonl(path, "row"):
        q, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if (not isinstance(q, str) or not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
                or not all(isinstance(c, str) for c in choices) or not isinstance(answer, int)
                or not 0 <= answer < len(choices)):
            raise AdainferError(f"{path}:{n}", 'expected {"question": str, "choices": [str, ...], "answer": int}')
        x = q + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        out.append(Example(x, LETTERS[answer], [LETTERS[answer]], answer))
    return out


def _squad(path: Path) -> list[Example]:
    out = []
    for n, row in read_jsonl(path, "row"):
        ctx, q, answers = row.get("context"), row.get("question"), row.get("answers")
        if (not isinstance(ctx, str) or not isinstance(q, str) or not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a for a in answers)):
            raise AdainferError(f"{path}:{n}", 'expected {"context": str, "question": str, "answers": [str, ...]}')
        out.append(Example(f"{ctx}\nQuestion: {q}", answers[0], list(answers)))
    return out


def query_template(template: str) -> tuple[str, str]:
    """(demonstration template, query template): the query is the demonstration cut before ' {y}'."""
    if "{x}" not in template or "{y}" not in template:
        raise AdainferError("--template", "a template needs {x} and {y}, e.g. 'Q: {x}\\nA: {y}\\n\\n'")
    return template, template[:template.index("{y}")].rstrip(" ")


def resolve_template(name_or_text: str | None) -> str:
    if name_or_text is None:
        return TEMPLATES["qa"]
    return TEMPLATES.get(name_or_text, name_or_text.replace("\\n", "\n"))  # "\n" typed on a command line


def demonstrations(pool: list[Example], k: int, seed: int, key: str, exclude: Example | None = None) -> list[Example]:
    """k demonstrations drawn from `pool` with a seed fixed per (seed, key); never `exclude` itself."""
    if k == 0:
        return []
    candidates = [e for e in pool if e is not exclude]
    if len(candidates) < k:
        raise AdainferError("--shots", f"{k} demonstrations asked, the pool holds {len(candidates)}")
    return random.Random(f"{seed}:{key}").sample(candidates, k)


def build_prompt(example: Example, demos: list[Example], template: str) -> str:
    demo_t, query_t = query_template(template)
    return "".join(demo_t.format(x=d.x, y=d.y) for d in demos) + query_t.format(x=example.x)


def task_prompts(task: Task, split: str, shots: int, seed: int = 0, template: str | None = None,
                 limit: int | None = None) -> list[tuple[str, Example]]:
    """(prompt, example) for the first `limit` rows of a split, demonstrations from the train pool."""
    template = resolve_template(template)
    rows = task.eval if split == "eval" else task.train
    rows = rows[:limit] if limit else rows
    out = []
    for i, ex in enumerate(rows):
        demos = demonstrations(task.train, shots, seed, f"{task.name}:{split}:{i}", exclude=ex)
        out.append((build_prompt(ex, demos, template), ex))
    return out


def answer_ids(tok, example: Example) -> set[int]:
    """The accepted first tokens: of " " + each answer (the template puts a space after "A:")."""
    return {tok.piece_id(" " + a) for a in example.answers}


def label_candidates(task: Task) -> list[str] | None:
    """The candidate strings for candidate mode: " " + each label word or option letter."""
    return None if task.labels is None else [" " + w for w in task.labels]
