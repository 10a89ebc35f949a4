"""The Python API under the CLIs: adainfer.load / Engine.generate / adainfer.calibrate / adainfer.evaluate give what
the command lines give, the README's example runs as written, and imports point one way."""

import argparse
import ast
import json
import re

import pytest
from helpers import ROOT, run_cli

import adainfer
from adainfer.exit import ExitClassifier

WORDS = ["awful", "great"]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return adainfer.load(tiny_model, "float32")


def test_generate_equals_the_run_cli(engine, tiny_model, tmp_path):
    prompts = ["a much longer prompt than the others, to pad", "hi", "medium sized prompt", "x"]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    proc = run_cli("adainfer.run", "--model", tiny_model, "--prompts", f, "--batch-size", "3", "--json",
                   "--dtype", "float32", "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    cli = [json.loads(line) for line in proc.stdout.splitlines()]
    api = engine.generate(prompts, 4, batch_size=3, sampling=adainfer.Sampling(temperature=0.8, seed=3))
    assert [r.prompt for r in api] == prompts
    for a, c in zip(api, cli):
        d = a.to_dict()
        assert set(d) == set(c)
        assert (d["token_ids"], d["layers_run"], d["text"]) == (c["token_ids"], c["layers_run"], c["text"])
    # one prompt as a string; an exit rule that fires after the first block; dense beside it
    clf = ExitClassifier("gap", ["gap"], [1.0], 1.0, first_layer=1)  # gap > -1: always
    [r] = engine.generate("hello", exit=clf, compare_dense=True)
    assert r.layers_run == [1] and r.dense_text is not None and r.dense_seconds > 0
    with pytest.raises(adainfer.AdainferError, match="--max-new-tokens"):
        engine.generate("hello", 0)


def test_calibrate_and_evaluate_equal_their_clis(engine, tiny_model, tmp_path):
    rows = [{"text": f"review number {i}", "label": WORDS[i % 2]} for i in range(18)]
    f = tmp_path / "mysent.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("adainfer.calibrate", "--model", tiny_model, "--task-file", f, "--labels", *WORDS, "--shots", "1",
                   "--dtype", "float32", "--check-cost", "0.3", "--out", tmp_path / "cli.json")
    assert proc.returncode == 0, proc.stderr
    # the same defaults, the same fit (the check cost given: by default it is measured, a timing that varies)
    clf = adainfer.calibrate(engine, task_file=f, labels=WORDS, shots=1, check_cost=0.3, progress=False)
    assert clf.to_json() == ExitClassifier.load(tmp_path / "cli.json").to_json()
    clf.save(tmp_path / "api.json")

    methods = ["dense", f"svm:{tmp_path / 'api.json'}", "skip-last-1", "oracle"]
    proc = run_cli("adainfer.eval", "--model", tiny_model, "--task-file", f, "--labels", *WORDS, "--shots", "2",
                   "--method", *methods, "--dtype", "float32", "--no-figures", "--out", tmp_path / "cli_eval.json")
    assert proc.returncode == 0, proc.stderr
    results = adainfer.evaluate(engine, task_file=f, labels=WORDS, methods=methods, shots=[2], progress=False)
    cli = json.loads((tmp_path / "cli_eval.json").read_text())
    assert results.task == cli["task"] == "mysent" and results.summary().keys() == cli["runs"][0]["methods"].keys()
    for name, m in cli["runs"][0]["methods"].items():
        api = results.runs[0]["methods"][name]["records"]
        assert [(r["prediction"], r["layers_run"]) for r in api] == \
            [(r["prediction"], r["layers_run"]) for r in m["records"]]
    assert results.summary()["skip-last-1"]["avg_layers"] == 2
    assert set(results.to_dict()) == set(cli)


@pytest.mark.realmodel
@pytest.mark.slow
def test_readme_python_example_runs_as_written(default_model_dir, tmp_path):
    code = re.search(r"## From Python.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "example.py").write_text(code)
    proc = run_cli("example", cwd=tmp_path)  # python -m example, in a fresh folder (it writes reviews.jsonl there)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    m = re.match(r"' positive' after (\d+) of 30 layers", first)
    assert m and int(m.group(1)) < 30, proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines()[-3:]] == ["dense", "svm:reviews_exit.json",
                                                                          "oracle"]


# ---------------------------------------------------------------- imports point one way

PACKAGE = ROOT / "adainfer"
CLI_MODULES = {"adainfer.run", "adainfer.calibrate", "adainfer.eval.__main__", "adainfer.eval.report", "adainfer.cli"}
# module -> what it may not import (at any depth of its own imports)
NEVER = {
    "adainfer.quant": ("adainfer.model", "adainfer.generate", "adainfer.fast_decode", "adainfer.fast_prefill",
                       "adainfer.engine"),
    "adainfer.translator": ("adainfer.exit", "adainfer.model", "adainfer.generate", "adainfer.engine", "sklearn"),
    "adainfer.exit": ("adainfer.model", "adainfer.generate", "adainfer.engine", "sklearn"),
    "adainfer.model": ("adainfer.generate", "adainfer.fast_decode", "adainfer.fast_prefill", "adainfer.engine",
                       "adainfer.calibration", "adainfer.eval", "weights_convert", "sklearn"),
    "adainfer.loading": ("weights_convert", "adainfer.generate", "adainfer.engine"),
    "adainfer.fast_decode": ("adainfer.fast_prefill", "adainfer.generate", "adainfer.engine"),
}


def module_imports() -> dict[str, set[str]]:
    """Every module of adainfer / weights_convert -> the modules of ours it imports at its top level."""
    out = {}
    for folder in ("adainfer", "weights_convert"):
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            tree = ast.parse(path.read_text())
            found = set()
            for node in tree.body:  # top level only: function-level imports are deliberate late imports
                if isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
            out[name] = {m for m in found if m.split(".")[0] in ("adainfer", "weights_convert", "sklearn")}
    return out


def test_imports_point_one_way():
    graph = module_imports()

    def reach(name, seen):
        for dep in graph.get(name, ()):
            if dep not in seen:
                seen.add(dep)
                reach(dep, seen)
        return seen

    for name in graph:
        assert name not in reach(name, set()), f"{name} imports itself through {reach(name, set())}"
    for name, banned in NEVER.items():
        hit = [d for d in reach(name, set()) for b in banned if d == b or d.startswith(b + ".")]
        assert not hit, f"{name} reaches {hit}"
    # the kernels import nothing of ours but each other
    kernels = [name for name in graph if name.startswith("adainfer.kernels")]
    assert "adainfer.kernels.top2" in kernels
    for name in kernels:
        outside = [d for d in reach(name, set()) if not d.startswith("adainfer.kernels")]
        assert not outside, f"{name} reaches {outside}"
    # argparse lives in the command-line shells only
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if "import argparse" in path.read_text():
            assert name in CLI_MODULES, f"{name} imports argparse: keep Namespace objects in the CLI layer"


def test_cli_main_turns_bad_input_into_one_line(capsys):
    from adainfer.cli import cli_main

    def run(args):
        raise adainfer.AdainferError("--thing", "is wrong")

    assert cli_main(argparse.ArgumentParser(), run, []) == 2
    assert capsys.readouterr().err == "error: --thing: is wrong\n"
    assert cli_main(argparse.ArgumentParser(), lambda args: None, []) == 0


def test_no_top_level_package_of_ours_shadows_another_distribution():
    """Our importable names are adainfer and weights_convert: a top-level `kernels` (where our kernels lived until
    transformers 5.25 began to import the Hugging Face `kernels` distribution) shadowed that package from the
    repository root and broke `import transformers`'s models."""
    import importlib.util
    from pathlib import Path

    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert include == '"adainfer*", "weights_convert*"'
    top = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert top == {"adainfer", "weights_convert"}, top
    spec = importlib.util.find_spec("kernels")
    assert spec is None or ROOT not in Path(spec.origin).parents
