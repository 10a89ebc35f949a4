"""What tests/test_distributed.py compares between one process and a tensor-parallel run: run as
`python tests/tp_worker.py MODEL OUT.json THRESHOLD` (one process) or under torchrun with `--tp N` appended; rank 0
writes logits, exit layers, tokens and generations as JSON."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from adainfer import distributed  # noqa: E402
from adainfer.exit import ExitClassifier, ExitRule, Plan  # noqa: E402
from adainfer.generate import generate, left_pad  # noqa: E402
from adainfer.loading import load_model  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 250, 7, 41], [9, 9, 120], [33, 200, 1, 77, 64, 12, 8, 150, 151, 152, 3], [60]]


def main() -> None:
    folder, out, threshold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    tp = int(sys.argv[sys.argv.index("--tp") + 1]) if "--tp" in sys.argv else 1
    torch.set_num_threads(1)
    world = distributed.init("cpu", tp)
    model, _ = load_model(folder, "float32", "cpu", world)
    tokens, mask = left_pad(PROMPTS, 0, "cpu")
    dense = model(tokens, pad_mask=mask, plan=Plan(hidden_states=True))
    logits = model.logits(dense.hidden_states[-1])  # (B, T, V) every position
    gaps = ExitRule(ExitClassifier("never", ["gap"], [0.0], -1.0, 1, 1))
    feats = model(tokens, pad_mask=mask, plan=Plan(exit=gaps, record_features=True)).features
    rule = ExitRule(ExitClassifier("svm", ["gap"], [1.0], -threshold, 1, 1))  # gap > threshold
    ran = model(tokens, pad_mask=mask, plan=Plan(exit=rule))
    cands = torch.tensor([3, 12, 99, 150])
    picked = model(tokens, pad_mask=mask, plan=Plan(exit=rule, candidates=cands))
    result = {
        "local_shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "fingerprint": model.fingerprint,
        "logits": logits[mask].tolist(),
        "gaps": [f["gap"].tolist() for f in feats],
        "exit_layers": ran.layers_run.tolist(), "exit_tokens": ran.token.tolist(), "exit_logits": ran.logits.tolist(),
        "candidate_layers": picked.layers_run.tolist(), "candidate_tokens": picked.token.tolist(),
    }
    for mode in ("none", "sequence", "token"):
        gens = generate(model, PROMPTS, 12, Plan(exit=None if mode == "none" else rule), mode=mode)
        result[f"generate_{mode}"] = [(g.token_ids, g.layers_run) for g in gens]
    if world.main:
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
