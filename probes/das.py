"""Distributed alignment search (DAS) and interchange intervention accuracy (IIA) (docs/METHODS.md, "Probes").

A high-level causal model says what the output should be when a variable of a base input is set
to its value on a source input (the counterfactual target). DAS learns a k-dimensional subspace
of one site at one position (the first k rows of an orthogonal rotation) such that swapping that
subspace from the source run into the base run produces the counterfactual output:
    h <- h + ((h_source - h) @ W.T) @ W,    W [k, d] with orthonormal rows.
The swap is an interp `Replace` op, so training and evaluation go through the engine's runs.
IIA is the held-out accuracy of the intervened model against the counterfactual targets. Every
report carries the same measurement on a randomly initialised copy of the model (linear maps can
still find structure there; non-linear ones reach 100% on random models), the IIA of swapping the
whole vector, and the rate at which the unintervened base output already equals the target.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

import interp
from interp import Replace, Result, at
from interp.collect import collect_batch

from .baseline import random_copy
from .maps import row_axis


@dataclass(frozen=True, eq=False)
class Alignment:
    """A learned subspace: W [k, d] with orthonormal rows at `site`, position `pos`."""

    W: torch.Tensor
    site: str
    pos: int
    meta: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.W.shape[0]

    def rotation(self) -> torch.Tensor:
        """A full orthogonal [d, d] rotation whose first k rows are W (the rest completes the basis)."""
        W = self.W.double()
        d = W.shape[1]
        _, vecs = torch.linalg.eigh(torch.eye(d, dtype=torch.double) - W.T @ W)  # complement: eigenvalue 1
        return torch.cat([W, vecs[:, self.k:].T]).to(self.W.dtype)

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        W = self.W.to(base.dtype)
        return base + ((source - base) @ W.T) @ W

    def op(self, source: torch.Tensor) -> Replace:
        """The Replace op that swaps this subspace in from `source` activations [batch, d]."""
        return _swap_op(self.site, self.pos, source, lambda: self.W)


def _swap_op(site: str, pos: int, source: torch.Tensor, weight) -> Replace:
    src = source.reshape(source.shape[0], 1, -1)

    def fn(sel: torch.Tensor) -> torch.Tensor:
        flat = sel.flatten(2)
        if flat.shape[0] != src.shape[0]:
            raise ValueError(f"interchange at {site!r}: {flat.shape[0]} base items but {src.shape[0]} source rows")
        W = weight()
        if W is None:                                  # swap the whole vector
            return src.to(sel.dtype).reshape(sel.shape)
        W = W.to(flat.dtype)
        return (flat + ((src.to(flat.dtype) - flat) @ W.T) @ W).reshape(sel.shape)

    return Replace(site, fn, where=at(pos=pos))


def _take(inputs, idx: torch.Tensor):
    if isinstance(inputs, torch.Tensor):
        return inputs[idx]
    return [inputs[int(i)] for i in idx]


def _n(inputs) -> int:
    return inputs.shape[0] if isinstance(inputs, torch.Tensor) else len(inputs)


def _batches(lm: interp.Instrumented, inputs, order: torch.Tensor, batch_size: int):
    """Index batches in `order` whose inputs share one token length (prompts of other lengths go to other batches)."""
    if isinstance(inputs, torch.Tensor):
        lengths = [0] * _n(inputs)
    else:
        cache = lm.__dict__.setdefault("_probe_lengths", {})
        lengths = [cache.setdefault(x, len(lm.tokens(x))) if isinstance(x, str) else 0 for x in inputs]
    groups: dict[int, list[int]] = {}
    for i in order.tolist():
        groups.setdefault(lengths[i], []).append(i)
    for members in groups.values():
        for s in range(0, len(members), batch_size):
            yield torch.tensor(members[s:s + batch_size])


def site_activations(lm: interp.Instrumented, inputs, site: str, pos: int, batch_size: int = 64) -> torch.Tensor:
    """Activations [N, d] of `site` at position `pos` (per-head sites flattened), via interp.collect."""
    out = None
    for idx in _batches(lm, inputs, torch.arange(_n(inputs)), batch_size):
        t = collect_batch(lm, _take(inputs, idx), [site], pos, dtype=None, device=None, flatten=True,
                          last_only=True)[site]
        if out is None:
            out = torch.empty(_n(inputs), t.shape[1], dtype=t.dtype, device=t.device)
        out[idx.to(t.device)] = t
    return out


def _readout(logits: torch.Tensor, candidates) -> torch.Tensor:
    last = logits[:, -1] if logits.dim() == 3 else logits
    return last.float() if candidates is None else last[:, list(candidates)].float()


def fit_das(lm: interp.Instrumented, site: str, pos: int, base, source, targets: torch.Tensor, *, k: int = 1,
            candidates: Sequence[int] | None = None, epochs: int = 10, lr: float = 0.01, batch_size: int = 64,
            seed: int = 0, progress: bool = True) -> Alignment:
    """Learn W [k, d] (orthonormal rows) so that swapping it in from `source` yields `targets`.

    targets index `candidates` (token ids compared at the last position) or, without candidates,
    the whole vocabulary.
    """
    targets = torch.as_tensor(targets).long()
    if not (_n(base) == _n(source) == len(targets)):
        raise ValueError(f"base ({_n(base)}), source ({_n(source)}) and targets ({len(targets)}) must align one to one")
    src = site_activations(lm, source, site, pos, batch_size)
    d = src.shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"k={k} is not a subspace size of {site!r}, which has {d} features: choose 1 <= k <= {d}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = nn.utils.parametrizations.orthogonal(nn.Linear(d, k, bias=False))
        order = [torch.randperm(len(targets)) for _ in range(epochs)]
    lin = lin.to(src.device)
    params = list(lin.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * sum(1 for _ in _batches(lm, base, torch.arange(len(targets)), batch_size))
    bar = tqdm(total=steps, desc=f"DAS {site}@{pos}", disable=not progress, leave=False)
    try:
        for perm in order:
            for idx in _batches(lm, base, perm, batch_size):
                op = _swap_op(site, pos, src[idx], lambda: lin.weight)
                with torch.enable_grad():
                    out = lm.run(_take(base, idx), ops=[op], grad=True, last_only=True)
                    loss = nn.functional.cross_entropy(_readout(out.logits, candidates),
                                                       targets[idx].to(out.logits.device))
                    grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
    with torch.no_grad():
        W = lin.weight.detach().clone()
    return Alignment(
        W, site, pos, {"k": k, "epochs": epochs, "lr": lr, "n_train": len(targets), "final_loss": loss.item()}
    )


def iia(lm: interp.Instrumented, alignment: Alignment | None, base, source, targets, *, site: str | None = None,
        pos: int | None = None, candidates=None, batch_size: int = 64) -> float:
    """Fraction of pairs whose intervened output equals the counterfactual target.

    alignment=None swaps the whole vector at (site, pos) instead of a subspace.
    """
    targets = torch.as_tensor(targets).long()
    site = alignment.site if alignment is not None else site
    pos = alignment.pos if alignment is not None else pos
    src = site_activations(lm, source, site, pos, batch_size)
    weight = (lambda: None) if alignment is None else (lambda: alignment.W)
    hits = 0
    with torch.no_grad():
        for idx in _batches(lm, base, torch.arange(len(targets)), batch_size):
            out = lm.run(_take(base, idx), ops=[_swap_op(site, pos, src[idx], weight)], last_only=True)
            hits += int((_readout(out.logits, candidates).argmax(-1).cpu() == targets[idx]).sum())
    return hits / max(1, len(targets))


def base_agreement(lm: interp.Instrumented, base, targets, candidates=None, batch_size: int = 64) -> float:
    """Fraction of pairs whose target the unintervened base run already predicts (the floor IIA starts from)."""
    targets = torch.as_tensor(targets).long()
    hits = 0
    with torch.no_grad():
        for idx in _batches(lm, base, torch.arange(len(targets)), batch_size):
            out = lm.run(_take(base, idx), last_only=True)
            hits += int((_readout(out.logits, candidates).argmax(-1).cpu() == targets[idx]).sum())
    return hits / max(1, len(targets))


def _split(n: int, test_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must lie in (0, 1), got {test_frac}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_frac)))
    return perm[n_test:], perm[:n_test]


MEASURES = ("iia", "iia_full_vector", "base_agreement")


def _measure(lm, site, pos, base, source, targets, tr, te, k, candidates, train_kw) -> tuple[list[float], Alignment]:
    al = fit_das(lm, site, pos, _take(base, tr), _take(source, tr), targets[tr], k=k, candidates=candidates, **train_kw)
    bs, ss, ts = _take(base, te), _take(source, te), targets[te]
    bsz = train_kw.get("batch_size", 64)
    vals = [iia(lm, al, bs, ss, ts, candidates=candidates, batch_size=bsz),
            iia(lm, None, bs, ss, ts, site=site, pos=pos, candidates=candidates, batch_size=bsz),
            base_agreement(lm, bs, ts, candidates, bsz)]
    return vals, al


def das(lm: interp.Instrumented, site: str, pos: int, base, source, targets, *, k: int = 1, candidates=None,
        test_frac: float = 0.3, random_baseline: bool = True, seed: int = 0, **train_kw) -> Result:
    """Train DAS at one (site, pos) on a split of the pairs and report held-out IIA.

    Result axes (model, measure): model in ("trained", "random-init"), measures iia (the learned
    k-dim subspace), iia_full_vector (swap everything at the site), base_agreement (no swap).
    attrs["alignment"] holds the trained model's W as a list.
    """
    res = iia_map(lm, [site], [pos], base, source, targets, k=k, candidates=candidates, test_frac=test_frac,
                  random_baseline=random_baseline, seed=seed, **train_kw)
    return res.sel(**{_row(site): _row_coord(site), "pos": pos})


def _row(site: str) -> str:
    return row_axis([site])[0]


def _row_coord(site: str):
    return row_axis([site])[1][0]


def iia_map(lm: interp.Instrumented, sites: Sequence[str], positions: Sequence[int], base, source, targets, *,
            k: int = 1, candidates=None, test_frac: float = 0.3, random_baseline: bool = True, seed: int = 0,
            progress: bool = True, **train_kw) -> Result:
    """DAS at every site x position: Result axes (model, measure, layer|site, pos), held-out IIA."""
    targets = torch.as_tensor(targets).long()
    tr, te = _split(len(targets), test_frac, seed)
    models = {"trained": lm}
    if random_baseline:
        models["random-init"] = interp.attach(random_copy(lm.model, seed), tokenizer=lm.tokenizer)
    out = torch.zeros(len(models), len(MEASURES), len(sites), len(positions))
    train_kw = {"seed": seed, "progress": False, **train_kw}
    bar = tqdm(total=len(models) * len(sites) * len(positions), desc="IIA map", disable=not progress, leave=False)
    alignments = {}
    try:
        for a, (name, m) in enumerate(models.items()):
            for i, site in enumerate(sites):
                for j, pos in enumerate(positions):
                    vals, al = _measure(m, site, pos, base, source, targets, tr, te, k, candidates, train_kw)
                    out[a, :, i, j] = torch.tensor(vals)
                    if name == "trained":
                        alignments[f"{site}@{pos}"] = al.W.tolist() if al.W.numel() <= 4096 else None
                    bar.update(1)
    finally:
        bar.close()
    ax, rows = row_axis(list(sites))
    return Result(out, ("model", "measure", ax, "pos"),
                  {"model": list(models), "measure": list(MEASURES), ax: rows, "pos": list(positions)},
                  {"k": k, "n_train": len(tr), "n_test": len(te), "metric": "interchange intervention accuracy",
                   "sites": list(sites), "alignment": alignments})


__all__ = ["Alignment", "fit_das", "iia", "base_agreement", "das", "iia_map", "site_activations", "MEASURES"]
