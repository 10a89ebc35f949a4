"""The paper's tasks read from jsonl files (the layout of ../shared/data), and their few-shot prompts.

Prompt template (AdaInfer §5.1): `Q: {x}\\nA: {y}\\n\\n` for each of k demonstrations, then `Q: {x}\\nA:`; the
prediction is the next token, compared with the first token of " " + answer. Demonstrations come from the task's
train split with a fixed seed and never include the evaluated row.

Splits: SST-2 train/dev, AG News train/test, MMLU dev/test. CommonsenseQA and SQuAD ship a dev split only: rows
whose index is a multiple of 3 form the train (demonstration and calibration) pool, the others are evaluated.

A user's own task is one jsonl file (`load_task_file`), every row in one of three shapes: `{"prompt", "answer"}`
(a free answer), `{"text", "label"}` with the label words given (classification), or `{"question", "choices",
"answer"}` (multiple choice, one option letter per choice). Its train pool is a second file of the same shape, or
else every third row of the file, as for CommonsenseQA.
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
    choices: list[str] = field(default_factory=list)  # a multiple-choice row's options


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


LAYOUT = ("sst2/{train,dev}.jsonl, agnews/{train,test}.jsonl + labels.json, mmlu/{dev,test}.jsonl, "
          "csqa/dev.jsonl, squad/dev.jsonl")


def load_task(name: str, data_dir: Path | None = None) -> Task:
    """A built-in task from a data folder in the layout of shared/data (adainfer ships loaders, not datasets)."""
    if name not in TASKS:
        raise AdainferError("--task", f"unknown task {name!r}: the built-in tasks are {', '.join(TASKS)}; for your "
                                      "own rows use --task-file FILE.jsonl")
    root = Path(data_dir or default_data_dir()) / name
    if not root.is_dir():
        raise AdainferError(root, f"task data folder not found. adainfer ships no datasets: pass --data DIR (or set "
                                  f"ADAINFER_DATA) to a folder laid out as {LAYOUT}, or give your own rows with "
                                  "--task-file FILE.jsonl")
    if name == "sst2":
        labels = ["negative", "positive"]
        return Task(name, _classification(root / "train.jsonl", labels), _classification(root / "dev.jsonl", labels),
                    labels)
    if name == "agnews":
        labels = _labels(root / "labels.json")
        return Task(name, _classification(root / "train.jsonl", labels),
                    _classification(root / "test.jsonl", labels), labels)
    if name == "mmlu":
        train, test = _choices(root / "dev.jsonl"), _choices(root / "test.jsonl")
        return Task(name, train, test, option_letters(train + test))
    if name == "csqa":
        rows = _choices(root / "dev.jsonl")
        return Task(name, *_thirds(rows), option_letters(rows))
    return Task(name, *_thirds(_squad(root / "dev.jsonl")), None)


def task_source(name: str | None, data_dir: Path | None = None, task_file: Path | None = None,
                labels: list[str] | None = None, demos: Path | None = None) -> Task:
    """A built-in task by name, or a user's task file; --labels and --demos belong to task files only."""
    if task_file is not None:
        return load_task_file(task_file, labels, demos)
    for flag, value in (("--labels", labels), ("--demos", demos)):
        if value:
            raise AdainferError(flag, "applies to --task-file only (the built-in tasks bring their own)")
    if name is None:
        raise AdainferError("--task", "give a built-in task name or --task-file FILE.jsonl")
    return load_task(name, data_dir)


def _thirds(rows: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train pool, eval rows): every third row, from the first, is the train pool."""
    return rows[0::3], [r for i, r in enumerate(rows) if i % 3]


def option_letters(rows: list[Example]) -> list[str] | None:
    """The candidate letters of a multiple-choice task: as many as its longest row has choices."""
    return list(LETTERS[:max(len(e.choices) for e in rows)]) if rows else None


SHAPES = {
    "free": ("prompt", "answer"),
    "classification": ("text", "label"),
    "choice": ("question", "choices", "answer"),
}


def load_task_file(path: Path, labels: list[str] | None = None, demos: Path | None = None) -> Task:
    """A user's own task: one jsonl file whose rows all have one of the SHAPES (see the module docstring).
    `labels`: the label words of a classification file (a row's label is the word or its index). `demos`: a file
    of the same shape for demonstrations and calibration; without it every third row of `path` is that pool."""
    path = Path(path)
    shape, rows = _user_rows(path, labels)
    if demos is not None:
        demo_shape, train = _user_rows(Path(demos), labels)
        if demo_shape != shape:
            raise AdainferError(demos, f"rows are {demo_shape} ({', '.join(SHAPES[demo_shape])}) but {path}'s are "
                                       f"{shape} ({', '.join(SHAPES[shape])})")
        evaluated = rows
    else:
        if len(rows) < 2:
            raise AdainferError(path, "needs at least 2 rows (every third row is the demonstration pool) or --demos")
        train, evaluated = _thirds(rows)
    if shape == "classification":
        candidates = list(labels)
    elif shape == "choice":
        candidates = option_letters(train + evaluated)
    else:
        candidates = None
    return Task(path.stem, train, evaluated, candidates)


def _user_rows(path: Path, labels: list[str] | None) -> tuple[str, list[Example]]:
    rows = read_jsonl(path, "row")
    if not rows:
        raise AdainferError(path, "no rows in file")
    first = rows[0][1]
    shape = next((k for k, keys in SHAPES.items() if set(keys) <= set(first)), None)
    if shape is None:
        raise AdainferError(f"{path}:{rows[0][0]}", "a row needs one of these shapes: "
                            + "; ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in SHAPES.values()))
    if shape == "classification":
        if not labels or len(labels) < 2 or not all(isinstance(w, str) and w.strip() for w in labels):
            raise AdainferError("--labels", f"{path} holds classification rows: give the label words, e.g. "
                                            "--labels negative positive")
        if len(set(labels)) != len(labels):
            raise AdainferError("--labels", f"label words repeat: {labels}")
    elif labels:
        raise AdainferError("--labels", f"{path} holds {shape} rows; --labels applies to {{text, label}} rows only")
    out = []
    for n, row in rows:
        if shape == "classification":
            out.append(_user_classification(row, labels, f"{path}:{n}"))
        elif shape == "choice":
            out.append(_user_choice(row, f"{path}:{n}"))
        else:
            prompt, answer = row.get("prompt"), row.get("answer")
            if not isinstance(prompt, str) or not prompt or not isinstance(answer, str) or not answer.strip():
                raise AdainferError(f"{path}:{n}", 'expected {"prompt": str, "answer": str}, both non-empty')
            out.append(Example(prompt, answer.strip(), [answer.strip()]))
    return shape, out


def _user_classification(row: dict, labels: list[str], where: str) -> Example:
    text, label = row.get("text"), row.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        index = label
    elif isinstance(label, str) and label in labels:
        index = labels.index(label)
    else:
        index = None
    if not isinstance(text, str) or not text or index is None:
        raise AdainferError(where, f'expected {{"text": str, "label": one of {labels} or its index 0..'
                                   f'{len(labels) - 1}}}, got label {label!r}')
    return Example(text, labels[index], [labels[index]], index)


def _user_choice(row: dict, where: str) -> Example:
    answer = row.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
        row = {**row, "answer": LETTERS.index(answer.upper())}  # an option letter, as in the prompt
    return _choice(row, where)


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
    return [_choice(row, f"{path}:{n}") for n, row in read_jsonl(path, "row")]


def _choice(row: dict, where: str) -> Example:
    q, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if (not isinstance(q, str) or not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) for c in choices) or isinstance(answer, bool) or not isinstance(answer, int)
            or not 0 <= answer < len(choices)):
        raise AdainferError(where, f'expected {{"question": str, "choices": [2 to {len(LETTERS)} str], "answer": '
                                   'choice index}')
    x = q + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return Example(x, LETTERS[answer], [LETTERS[answer]], answer, list(choices))


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
    """(prompt, example) for the rows of a split, demonstrations from the train pool. With `limit`, a sample of
    that many rows drawn with `seed` (in file order): files are often sorted (MMLU by subject), so the first rows
    would not stand for the rest."""
    template = resolve_template(template)
    rows = task.eval if split == "eval" else task.train
    index = list(range(len(rows)))
    if limit and limit < len(rows):
        index = sorted(random.Random(f"{seed}:{task.name}:{split}:limit").sample(index, limit))
    out = []
    for i in index:
        ex = rows[i]
        demos = demonstrations(task.train, shots, seed, f"{task.name}:{split}:{i}", exclude=ex)
        out.append((build_prompt(ex, demos, template), ex))
    return out


def answer_ids(tok, example: Example) -> set[int]:
    """The accepted first tokens: of " " + each answer (the template puts a space after "A:")."""
    return {tok.piece_id(" " + a) for a in example.answers}


def label_candidates(task: Task) -> list[str] | None:
    """The candidate strings for candidate mode: " " + each label word or option letter."""
    return None if task.labels is None else [" " + w for w in task.labels]
