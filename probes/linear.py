"""Linear probes: closed-form ridge and L2-logistic classifiers, held-out accuracy, control tasks.

Both probes standardise the features on the training split and minimise
    mean loss + lam * ||W||^2
(squared error on one-hot targets for ridge, cross-entropy for logistic). Ridge is solved in
closed form; with `lam="auto"` its penalty is chosen per fit from a grid by the exact
leave-one-out accuracy of the closed-form solution (no extra fits). Control tasks follow
Hewitt & Liang (2019): every type (e.g. each word or entity) gets a random label drawn from the
task's label distribution; selectivity = task accuracy - control accuracy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

LAM_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def encode_labels(labels: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, list]:
    """Labels of any hashable kind -> (class indices [N], sorted class values)."""
    vals = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if not vals:
        raise ValueError("no labels: a probe needs at least two labelled examples")
    classes = sorted(set(vals), key=lambda v: (str(type(v)), v))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[v] for v in vals], dtype=torch.long), classes


def _check(X: torch.Tensor, y: torch.Tensor) -> None:
    if X.dim() != 2:
        raise ValueError(f"probe features must be [n_examples, n_features], got shape {tuple(X.shape)}: "
                         "flatten positions/heads first or pick one position")
    if y.shape != (X.shape[0],):
        raise ValueError(f"{X.shape[0]} feature rows but labels of shape {tuple(y.shape)}: pass one label per row")


@dataclass(frozen=True, eq=False)
class Probe:
    """A fitted linear classifier: logits = ((x - mean) / scale) @ W + b."""

    kind: str
    W: torch.Tensor        # [D, C]
    b: torch.Tensor        # [C]
    mean: torch.Tensor     # [D]
    scale: torch.Tensor    # [D]
    classes: tuple
    lam: float

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        X = torch.as_tensor(X).to(self.W.dtype)
        return ((X - self.mean) / self.scale) @ self.W + self.b

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Class indices (into `classes`)."""
        return self.logits(X).argmax(-1)

    def accuracy(self, X: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(X) == torch.as_tensor(y)).double().mean())

    def weight(self, c: int = -1) -> torch.Tensor:
        """The direction in raw feature space that raises class c's logit against the mean class."""
        Wr = self.W / self.scale[:, None]
        return (Wr[:, c] - Wr.mean(1)).float()


def _standardise(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = X.mean(0)
    scale = X.std(0, unbiased=False).clamp_min(1e-6 * max(1.0, float(X.abs().max())))
    return (X - mean) / scale, mean, scale


def fit_ridge(X: torch.Tensor, y: torch.Tensor, n_classes: int | None = None, lam: float | str = "auto",
              grid: Sequence[float] = LAM_GRID) -> Probe:
    """Closed-form ridge classifier on one-hot targets; lam="auto" picks lam by exact leave-one-out accuracy."""
    _check(X, y)
    X = X.double()
    C = int(n_classes or int(y.max()) + 1)
    Z, mean, scale = _standardise(X)
    N, D = Z.shape
    Y = torch.nn.functional.one_hot(y, C).double()
    ybar = Y.mean(0)
    Yc = Y - ybar
    # dual form: K = Z Z^T = U diag(s) U^T; W = Z^T (K + N lam I)^-1 Yc
    K = Z @ Z.T
    s, U = torch.linalg.eigh(K)
    s = s.clamp_min(0)
    UtY = U.T @ Yc
    if lam == "auto":
        best = None
        for cand in grid:
            acc = float((_loo_predict(U, s, UtY, Yc, N * cand) + ybar).argmax(1).eq(y).double().mean())
            if best is None or acc >= best[0]:                         # ties go to the larger penalty
                best = (acc, cand)
        lam = best[1]
    lam = float(lam)
    alpha = U @ (UtY / (s + N * lam)[:, None])
    W = Z.T @ alpha
    return Probe("ridge", W, ybar, mean, scale, tuple(range(C)), lam)


def _loo_predict(U, s, UtY, Yc, penalty: float) -> torch.Tensor:
    """Exact leave-one-out predictions of ridge (fixed standardisation): y_i - r_i / (1 - H_ii)."""
    shrink = s / (s + penalty)
    fitted = U @ (shrink[:, None] * UtY)
    h = (U * U * shrink).sum(1).clamp_max(1 - 1e-9)                    # diag of the hat matrix
    return Yc - (Yc - fitted) / (1 - h)[:, None]


def ridge_loo_predictions(X: torch.Tensor, y: torch.Tensor, lam: float, n_classes: int | None = None) -> torch.Tensor:
    """Leave-one-out class scores [N, C] of the ridge probe at `lam`, in closed form (used by lam="auto")."""
    _check(X, y)
    C = int(n_classes or int(y.max()) + 1)
    Z, _, _ = _standardise(X.double())
    Y = torch.nn.functional.one_hot(y, C).double()
    ybar = Y.mean(0)
    s, U = torch.linalg.eigh(Z @ Z.T)
    return _loo_predict(U, s.clamp_min(0), U.T @ (Y - ybar), Y - ybar, Z.shape[0] * lam) + ybar


def fit_logistic(X: torch.Tensor, y: torch.Tensor, n_classes: int | None = None, lam: float = 1e-3,
                 max_iter: int = 100) -> Probe:
    """Multinomial logistic regression with an L2 penalty, fitted by full-batch L-BFGS."""
    _check(X, y)
    if not isinstance(lam, (int, float)):
        raise ValueError(f"the logistic probe takes a numeric lam (got {lam!r}); lam='auto' is ridge-only")
    C = int(n_classes or int(y.max()) + 1)
    Z, mean, scale = _standardise(X.double())
    W = torch.zeros(Z.shape[1], C, dtype=torch.double, requires_grad=True)
    b = torch.zeros(C, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W + b, y) + lam * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe("logistic", W.detach(), b.detach(), mean, scale, tuple(range(C)), float(lam))


def fit(X: torch.Tensor, y: torch.Tensor, kind: str = "ridge", n_classes: int | None = None,
        lam: float | str | None = None) -> Probe:
    """Fit a `kind` ("ridge" | "logistic") probe; lam=None uses that probe's default."""
    if kind == "ridge":
        return fit_ridge(X, y, n_classes, "auto" if lam is None else lam)
    if kind == "logistic":
        return fit_logistic(X, y, n_classes, 1e-3 if lam is None else lam)
    raise ValueError(f"unknown probe kind {kind!r}: choose 'ridge' (closed form) or 'logistic'")


# -- splits and control tasks ------------------------------------------------------------------

def kfold(
    n: int, k: int = 4, seed: int = 0, stratify: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k (train, test) index splits; stratified by class when `stratify` is given."""
    if n < 2 * k:
        raise ValueError(f"{n} examples are too few for {k}-fold held-out accuracy: collect at least {2 * k}")
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(n, dtype=torch.long)
    if stratify is None:
        fold[torch.randperm(n, generator=g)] = torch.arange(n) % k
    else:
        offset = 0
        for c in torch.unique(stratify):
            idx = torch.nonzero(stratify == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            fold[idx] = (torch.arange(len(idx)) + offset) % k
            offset += len(idx)
    return [(torch.nonzero(fold != f).flatten(), torch.nonzero(fold == f).flatten()) for f in range(k)]


def group_kfold(groups: Sequence[Any], k: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """k splits that hold out whole groups (e.g. every prompt about one landmark)."""
    gi, names = encode_labels(groups)
    if len(names) < k:
        raise ValueError(f"only {len(names)} groups for {k}-fold group hold-out: use k <= {len(names)}")
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(names), dtype=torch.long)
    fold_of[torch.randperm(len(names), generator=g)] = torch.arange(len(names)) % k
    fold = fold_of[gi]
    return [(torch.nonzero(fold != f).flatten(), torch.nonzero(fold == f).flatten()) for f in range(k)]


def control_labels(y: torch.Tensor, types: Sequence[Any], seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang control task: each type gets one label drawn from the empirical label distribution."""
    ti, names = encode_labels(types)
    if ti.shape != y.shape:
        raise ValueError(f"{len(ti)} types for {len(y)} labels: give one control type per example")
    g = torch.Generator().manual_seed(seed + 7919)
    probs = torch.bincount(y).double()
    per_type = torch.multinomial(probs / probs.sum(), len(names), replacement=True, generator=g)
    return per_type[ti]


def cv_accuracy(X: torch.Tensor, y: torch.Tensor, folds, kind: str = "ridge", lam=None,
                n_classes: int | None = None) -> float:
    """Mean held-out accuracy over the folds (each fold's probe fitted on the rest)."""
    C = n_classes or int(y.max()) + 1
    correct = total = 0
    for tr, te in folds:
        p = fit(X[tr], y[tr], kind, C, lam)
        correct += int((p.predict(X[te]) == y[te]).sum())
        total += len(te)
    return correct / max(1, total)


def evaluate(X: torch.Tensor, y: torch.Tensor, *, kind: str = "ridge", lam=None, types: Sequence[Any] | None = None,
             groups: Sequence[Any] | None = None, k: int = 4, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy (stratified k-fold), control accuracy and selectivity (when `types` are given),
    held-out-group accuracy (when `groups` are given), and the majority-class rate."""
    X = torch.as_tensor(X).float()
    _check(X, y)
    C = int(y.max()) + 1
    folds = kfold(len(y), k, seed, stratify=y)
    out = {"accuracy": cv_accuracy(X, y, folds, kind, lam, C),
           "chance": float(torch.bincount(y).max()) / len(y)}
    if types is not None:
        yc = control_labels(y, types, seed)
        out["control"] = cv_accuracy(X, yc, kfold(len(y), k, seed, stratify=yc), kind, lam, C)
        out["selectivity"] = out["accuracy"] - out["control"]
    if groups is not None:
        out["group_accuracy"] = cv_accuracy(X, y, group_kfold(groups, k, seed), kind, lam, C)
    return out


__all__ = ["Probe", "fit", "ridge_loo_predictions", "fit_ridge", "fit_logistic", "encode_labels", "kfold",
           "group_kfold", "control_labels", "cv_accuracy", "evaluate", "LAM_GRID"]
