"""Per-layer translators: a small learned map that lets the exit check read a middle layer the way the last layer
is read (the "tuned lens" idea, arXiv 2303.08112, fitted in closed form instead of by gradient descent).

After block n the exit check reads `final_norm(T_n(h_n))` through the LM head instead of `final_norm(h_n)`, where

    affine:     T_n(h) = h + h @ D_n + b_n          D_n (dim, dim)
    lowrank:R   T_n(h) = h + (h @ V_n) @ U_n + b_n   V_n (dim, R), U_n (R, dim)

is fitted by ridge regression of the final block's output (before the final norm) on h_n, over calibration
positions. The map is written as identity plus a correction, and the ridge penalty shrinks the correction, so a
strongly regularised translator is the plain reading (the "logit lens") and a zero one is exactly it. The penalty
is chosen per layer by k-fold cross-validation of the squared error. The low-rank map keeps the R directions of the
full correction that carry most of its fitted output (reduced-rank regression), for models where dim x dim per layer
is too big (a 4096-d model: 67 M parameters per full map).

A translator file is safetensors: per layer `layer.N.d` (affine) or `layer.N.u` and `layer.N.v` (lowrank) and
`layer.N.b`, all float32, with the kind, layers and the model's fingerprint in the header's metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adainfer.errors import AdainferError

FORMAT = "adainfer-translator"
VERSION = 1
KINDS = ("affine", "lowrank")
LAMBDAS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)  # ridge penalties tried, x the mean eigenvalue


@dataclass
class Translator:
    kind: str  # "affine" | "lowrank"
    dim: int
    maps: dict[int, dict[str, torch.Tensor]]  # blocks run n -> {"d"} or {"u", "v"}, and {"b"}; float32
    rank: int | None = None
    model: dict = field(default_factory=dict)  # {"fingerprint", "name", "n_layers"}
    fit: dict = field(default_factory=dict)  # per layer: the chosen penalty, cross-validated error; sample counts

    @property
    def layers(self) -> list[int]:
        return sorted(self.maps)

    def reads(self, n: int, n_layers: int) -> bool:
        """Whether a run that stops after block n answers through this translator: it maps block n, and block n is
        not the model's last (whose output the head reads as it is)."""
        return n in self.maps and n < n_layers

    def read(self, n: int, h: torch.Tensor) -> torch.Tensor:
        """The reading of (b, dim) states after block n, in their dtype (computed in float32)."""
        m = self.maps[n]
        x = h.float()
        corr = x @ m["d"] if "d" in m else (x @ m["v"]) @ m["u"]
        return (x + corr + m["b"]).to(h.dtype)

    def to(self, device) -> Translator:
        maps = {n: {k: t.to(device) for k, t in m.items()} for n, m in self.maps.items()}
        return Translator(self.kind, self.dim, maps, self.rank, self.model, self.fit)

    def keep(self, layers) -> Translator:
        """Only the maps of `layers` (what a classifier checks)."""
        return Translator(self.kind, self.dim, {n: self.maps[n] for n in layers}, self.rank, self.model, self.fit)

    @property
    def parameters(self) -> int:
        return sum(t.numel() for m in self.maps.values() for t in m.values())

    def describe(self) -> str:
        kind = self.kind if self.kind == "affine" else f"lowrank:{self.rank}"
        return f"{kind} translator, {len(self.maps)} layers, {self.parameters / 1e6:.2f} M parameters"

    def check_model(self, model, where: object) -> None:
        want, have = self.model.get("fingerprint"), getattr(model, "fingerprint", None)
        if want and have and want != have:
            raise AdainferError(where, f"translator was fitted for model {self.model.get('name') or want} "
                                       f"(fingerprint {want}), not this one ({have})")
        if self.dim != model.config.dim or max(self.maps, default=0) >= model.config.n_layers:
            raise AdainferError(where, f"translator is for a {self.dim}-d model with at least "
                                       f"{max(self.maps, default=0) + 1} layers, not this one")

    def save(self, path: Path) -> str:
        """Write atomically; return the file's sha256 (the same maps give the same bytes in any process)."""
        from safetensors.torch import save

        path = Path(path)
        tensors = {f"layer.{n}.{k}": t.detach().float().cpu().contiguous() for n, m in self.maps.items()
                   for k, t in m.items()}
        meta = {"format": FORMAT, "info": json.dumps({"version": VERSION, "kind": self.kind, "dim": self.dim,
                                                        "rank": self.rank, "model": self.model, "fit": self.fit})}
        raw = save(tensors, metadata=meta)
        # safetensors writes the metadata in hash-map order, which changes from process to process: sort it, so that
        # the classifier's sha256 of this file is reproducible (a data-parallel fit equals a single-process one).
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        tmp.replace(path)
        return sha256(path)

    @classmethod
    def load(cls, path: Path, device="cpu") -> Translator:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise AdainferError(path, "translator file not found")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise AdainferError(path, f"not an adainfer translator (format must be {FORMAT!r})")
                info = json.loads(meta["info"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise AdainferError(path, f"unreadable translator file: {e}") from None
        if info.get("version") != VERSION or info.get("kind") not in KINDS:
            raise AdainferError(path, f"translator version {info.get('version')!r} / kind {info.get('kind')!r} is not "
                                      f"{VERSION} / one of {KINDS}")
        maps: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            _, n, k = name.split(".")
            maps.setdefault(int(n), {})[k] = t.float().to(device)
        dim, rank = int(info["dim"]), info.get("rank")
        want = {"b": (dim,), **({"d": (dim, dim)} if info["kind"] == "affine" else
                                {"u": (rank, dim), "v": (dim, rank)})}
        for n, m in maps.items():
            if {k: tuple(t.shape) for k, t in m.items()} != want or not all(bool(t.isfinite().all())
                                                                          for t in m.values()):
                raise AdainferError(path, f"layer {n}: expected finite tensors of shapes {want}")
        return cls(info["kind"], dim, maps, rank, info.get("model", {}), info.get("fit", {}))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def identity(dim: int, layers, kind: str = "affine", rank: int = 1) -> Translator:
    """The translator that changes nothing (its readings are bit-identical to the plain ones)."""
    maps = {}
    for n in layers:
        m = {"d": torch.zeros(dim, dim)} if kind == "affine" else {"v": torch.zeros(dim, rank),
                                                                   "u": torch.zeros(rank, dim)}
        maps[n] = {**m, "b": torch.zeros(dim)}
    return Translator(kind, dim, maps, rank if kind == "lowrank" else None)


def parse_kind(spec: str | None) -> tuple[str | None, int | None]:
    """'affine' | 'lowrank:R' | 'none'/None -> (kind, rank)."""
    if spec in (None, "none"):
        return None, None
    if spec == "affine":
        return "affine", None
    if spec.startswith("lowrank:") and spec[len("lowrank:"):].isdigit() and int(spec[len("lowrank:"):]) >= 1:
        return "lowrank", int(spec[len("lowrank:"):])
    raise AdainferError("--translator", f"expected affine, lowrank:R (R >= 1) or none, got {spec!r}")


# ---------------------------------------------------------------- fitting


def ridge(X: np.ndarray, R: np.ndarray, lam: float) -> np.ndarray:
    """argmin_D |X D - R|^2 + lam |D|^2 for centred X (N, d), R (N, e): (X^T X + lam I)^-1 X^T R, by SVD."""
    U, s, Vt = np.linalg.svd(X, full_matrices=False)
    return Vt.T @ ((s / (s * s + lam))[:, None] * (U.T @ R))


def cv_penalty(X: np.ndarray, R: np.ndarray, folds: int = 5, seed: int = 0,
               grid: tuple[float, ...] = LAMBDAS) -> tuple[float, list[float]]:
    """The ridge penalty (`grid` x the mean eigenvalue of Xc^T Xc, Xc the centred X) with the least k-fold
    cross-validated squared error of predicting R from X (both centred per fold); also every candidate's error."""
    N = len(X)
    scale = float(X.var(0).sum()) * N / X.shape[1]  # mean eigenvalue of Xc^T Xc
    lams = [g * scale for g in grid]
    parts = np.array_split(np.random.default_rng(seed).permutation(N), min(folds, N))
    err = np.zeros(len(lams))
    for part in parts:
        tr = np.setdiff1d(np.arange(N), part)
        mx, mr = X[tr].mean(0), R[tr].mean(0)
        U, s, Vt = np.linalg.svd(X[tr] - mx, full_matrices=False)
        UtR = U.T @ (R[tr] - mr)  # (k, e)
        Z = (X[part] - mx) @ Vt.T  # (n, k): the held-out rows in the singular basis
        for j, lam in enumerate(lams):
            pred = (Z * (s / (s * s + lam))) @ UtR + mr
            err[j] += float(((pred - R[part]) ** 2).sum())
    err /= N
    return lams[int(np.argmin(err))], err.tolist()


def fit_layer(X: np.ndarray, Y: np.ndarray, kind: str, rank: int | None, folds: int = 5, seed: int = 0,
              penalty: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """One layer's map from states X (N, d) to targets Y (N, d), as float32 tensors, and how it was fitted (the
    penalty cross-validated unless given)."""
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    R = Y - X  # the correction to the identity
    lam, errors = cv_penalty(X, R, folds, seed) if penalty is None else (penalty, [float("nan")])
    mx, mr = X.mean(0), R.mean(0)
    D = ridge(X - mx, R - mr, lam)  # (d, d)
    info = {"penalty": lam, "cv_error": min(errors), "identity_error": float((R ** 2).sum(1).mean())}
    if kind == "affine":
        b = mr - mx @ D
        m = {"d": D}
    else:
        fitted = (X - mx) @ D  # (N, d): what the full map adds, centred
        W = np.linalg.svd(fitted, full_matrices=False)[2][:rank].T  # (d, r): its leading output directions
        V, Uo = D @ W, W.T  # D_r = D W W^T
        b = mr - mx @ V @ Uo
        m = {"v": V, "u": Uo}
    m["b"] = b
    return {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in m.items()}, info


def fit_translator(states: np.ndarray, target: np.ndarray, layers, kind: str, rank: int | None = None,
                   folds: int = 5, seed: int = 0, progress: bool = False,
                   penalties: dict[int, float] | None = None) -> Translator:
    """states (N, L, d): each sample's output after blocks 1..L (float); target (N, d): the final block's output.
    One map per n in `layers` (blocks run), its penalty from `penalties` or cross-validated."""
    from tqdm import tqdm

    if kind not in KINDS:
        raise AdainferError("--translator", f"unknown translator kind {kind!r}")
    if len(states) < max(folds, 2):
        raise AdainferError("--translator", f"{len(states)} samples are too few to fit a translator")
    maps, fits = {}, {}
    for n in tqdm(list(layers), desc="translators", unit="layer", disable=not progress):
        lam = None if penalties is None else penalties[n]
        maps[n], fits[str(n)] = fit_layer(states[:, n - 1], target, kind, rank, folds, seed, lam)
    return Translator(kind, states.shape[-1], maps, rank if kind == "lowrank" else None,
                      fit={"samples": int(len(states)), "folds": folds, "layers": fits})
