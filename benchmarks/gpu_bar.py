"""The bar of issue 15 (the GPU engine's goals) against what benchmarks/gpu_check.py measured: one line a goal, for
the sections that ran, with the variants' lines (other decode graphs, prefill paths, check variants) beside the
defaults'. A path that failed counts as a goal not met."""

from __future__ import annotations

CANDIDATES = 8  # head rows a candidate-mode check reads (a classification task's answer tokens)


def every(values: list, reduce) -> float:
    """reduce(values), or NaN (a goal not met) when any is missing (None or NaN: a path that failed)."""
    return float("nan") if any(v is None or v != v for v in values) or not values else reduce(values)


def bar(result: dict) -> list[dict]:
    """The issue's goals against what was measured (those of the sections that ran)."""
    dec = {r["batch"]: r for r in result.get("decode") or []}
    pre = result.get("prefill") or []
    checked = [r for r in pre if r["batch"] == 1 and "check_every_block_overhead" in r]  # (batch 1, first length)
    lines = []

    def best(path: str, *names: str) -> float:  # the cheapest of some check variants on a prefill path, batch 1
        return every([min(r.get(f"{path}{n}_overhead", float("nan")) for n in names) for r in checked], min)

    if 1 in dec or 8 in dec:  # (--batches may time either alone)
        limit = result["weight_read_limit_ms"]
        goals = [(1, "decode batch 1 <= 1.5x the weight-read limit (ms/token)", 1.5 * limit),
                 (8, "decode batch 8 <= 1.5 ms/token", 1.5)]
        goals = [(B, what, target) for B, what, target in goals if B in dec]
        lines += [(what, target, dec[B]["ours_graph_ms"], "<=") for B, what, target in goals]
        lines.append(("forced half-depth exit in decode >= 0.9 of the ideal 2x", 0.9,
                      min(r["half_depth_fraction_of_ideal_2x"] for r in dec.values()), ">="))
        for f in result.get("variants", []):  # the other captures: what switching the default to one would give
            lines += [(f"(fuse={f}) {what}", target, every([dec[B].get(f"ours_{f}_ms")], min), "<=")
                      for B, what, target in goals]
            lines.append((f"(fuse={f}) forced half-depth exit >= 0.9 of the ideal 2x", 0.9,
                          every([r.get(f"{f}_half_depth_fraction_of_ideal_2x") for r in dec.values()], min), ">="))
    if pre:
        lines += [
            ("prefill >= 1.3x transformers at every shape", 1.3, min(r["speedup_vs_hf"] for r in pre), ">="),
            ("(compile_prefill) prefill >= 1.3x transformers at every shape", 1.3,
             every([r.get("compiled_speedup_vs_hf") for r in pre], min), ">="),
            ("exit check after every block <= 10% at batch 1 (the better of reading every check / every 4)", 0.10,
             best("", "check_every_block", "check_every_block_read_every_4"), "<="),
            ("(capture_checks) exit check after every block <= 10% at batch 1", 0.10,
             best("", "check_every_block_captured", "check_every_block_captured_read_every_4"), "<="),
            ("(the full head's read alone after every block at copy bandwidth: the floor once device-bound)", 0.10,
             every([(result["n_layers"] - 1) * result["head_GB"] / result["copy_bandwidth_GBps"] / (r["ours_ms"] / 1e3)
                    for r in checked], min), "<="),
            (f"(candidates: {CANDIDATES} head rows) exit check after every block <= 10% at batch 1", 0.10,
             best("", "check_every_block_candidates", "check_every_block_candidates_captured",
                  "check_every_block_candidates_captured_read_every_4"), "<="),
            ("(compile_prefill, capture_checks) exit check after every block <= 10% at batch 1", 0.10,
             best("compiled_", "check_every_block_captured", "check_every_block_captured_read_every_4"), "<=")]
    if any("captured_ms" in r or "captured_error" in r for r in pre):  # (a GPU's)
        lines += [
            ("(--prefill captured) prefill >= 1.3x transformers at every shape", 1.3,
             every([r.get("captured_speedup_vs_hf") for r in pre], min), ">="),
            ("(--prefill captured, capture_checks) exit check after every block <= 10% at batch 1", 0.10,
             best("captured_", "check_every_block_captured", "check_every_block_captured_read_every_4"), "<="),
            (f"(--prefill captured, capture_checks, {CANDIDATES} candidate rows) exit check after every block <= 10% "
             f"at batch 1", 0.10, best("captured_", "check_every_block_candidates_captured",
                                       "check_every_block_candidates_captured_read_every_4"), "<="),
            ("(--prefill captured, capture_checks, --check-head int8) exit check after every block <= 10% at batch 1",
             0.10, best("captured_", "check_every_block_int8_captured"), "<=")]
    if result.get("kernel"):
        lines.append(("kernel no slower than the GEMV (worst kernel / GEMV, launched from Python)", 1.0,
                      max(r["kernel_over_gemv"] for r in result["kernel"]), "<="))
        lines.append(("kernel no slower than the GEMV (worst, both replayed from CUDA graphs)", 1.0,
                      max(r["kernel_in_graph_over_gemv_in_graph"] for r in result["kernel"]), "<="))
    out = []
    for what, goal, got, op in lines:
        out.append({"goal": what, "target": goal, "measured": got, "met": got <= goal if op == "<=" else got >= goal})
    return out
