"""Attribution patching (Nanda 2023): a first-order estimate of every patching effect at once.

    effect(site, pos) ~ (a_clean(site, pos) - a_corrupted(site, pos)) . dm/da(site, pos) at x_corrupted

for every layer and position from 2 forwards (clean, corrupted) and 1 backward. The gradient is
taken through interp's ops (a Replace that adds a zero tensor held by autograd), so no hook is
registered here. It is an approximation: `compare` reports it beside exact patching, with the
correlation, never instead of it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

import interp
from interp import Replace, Result

from .patching import KINDS, _labels, head_sweep, patch_sweep


def _grad_probe(site: str, delta: torch.Tensor) -> Replace:
    return Replace(site, fn=lambda sel, d=delta: sel + d.to(sel.dtype))


def attribution(lm: interp.Instrumented, clean, corrupted, kind: str = "resid_pre",
                metric: Callable[[torch.Tensor], torch.Tensor] | None = None, *, layers=None,
                normalize: bool = True, by_position: bool = True) -> Result:
    """Attribution-patching estimate of denoising `blocks.{l}.{kind}`: axes (layer, pos); for
    kind="attn.z", axes (layer, head, pos), or (layer, head) with by_position=False."""
    if kind not in (*KINDS, "attn.z"):
        raise ValueError(f"unknown kind {kind!r}; choose one of {(*KINDS, 'attn.z')}")
    if f"blocks.0.{kind}" not in lm.adapter.site_table():
        raise ValueError(f"this model has no {kind!r} sites; see `interp sites MODEL`")
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    sites = [f"blocks.{l}.{kind}" for l in layers]
    metric = metric or (lambda logits: logits[:, -1].float().max(-1).values)
    with torch.no_grad():
        a_clean = lm.run(clean, capture=sites, last_only=True)
        a_corr = lm.run(corrupted, capture=sites, last_only=True)
    deltas = {s: torch.zeros_like(a_corr.cache[s], requires_grad=True) for s in sites}
    out = lm.run(corrupted, ops=[_grad_probe(s, deltas[s]) for s in sites], last_only=True, grad=True)
    m = metric(out.logits).float()
    grads = torch.autograd.grad(m.sum(), [deltas[s] for s in sites])
    # [layer, batch, pos, *F] -> summed over features, mean over batch
    est = torch.stack([((a_clean.cache[s].float() - a_corr.cache[s].float()) * g.float())
                       .flatten(3 if kind == "attn.z" else 2).sum(-1).mean(0) for s, g in zip(sites, grads)])
    m_clean = float(metric(a_clean.logits).float().mean())
    m_corr = float(m.detach().mean())
    if normalize:
        if abs(m_clean - m_corr) < 1e-12:
            raise ValueError("clean and corrupted metrics are equal, so the normalised effect is undefined: "
                             "choose prompts whose metric differs or pass normalize=False")
        est = est / (m_clean - m_corr)
    tokens = a_corr.tokens[0] if a_corr.tokens else None
    T = est.shape[1]
    attrs = {"kind": kind, "method": "attribution patching", "normalized": normalize, "clean_metric": m_clean,
             "corrupted_metric": m_corr, "metric": "estimated normalised effect" if normalize else "estimated effect"}
    if kind == "attn.z":
        est = est.transpose(1, 2)  # [layer, head, pos]
        H = est.shape[1]
        if not by_position:
            return Result(est.sum(-1), ("layer", "head"), {"layer": layers, "head": list(range(H))}, attrs)
        return Result(est, ("layer", "head", "pos"),
                      {"layer": layers, "head": list(range(H)), "pos": _labels(tokens, range(T))}, attrs)
    return Result(est, ("layer", "pos"), {"layer": layers, "pos": _labels(tokens, range(T))}, attrs)


def correlation(a: Result, b: Result) -> float:
    """Pearson correlation of two results' values (same shape)."""
    x, y = a.values.float().reshape(-1), b.values.float().reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"results have different shapes {a.shape} and {b.shape}")
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).clamp_min(1e-12)
    return float((x * y).sum() / den)


def compare(lm: interp.Instrumented, clean, corrupted, kind: str = "resid_pre", metric: Callable | None = None,
            **kw) -> dict:
    """Attribution patching beside exact (denoising) patching: {"exact", "attribution", "correlation"}."""
    approx = attribution(lm, clean, corrupted, kind, metric, layers=kw.get("layers"))
    if kind == "attn.z":
        exact = head_sweep(lm, clean, corrupted, metric, by_position=True, **kw)
    else:
        exact = patch_sweep(lm, clean, corrupted, kind, metric, **kw)
    return {"exact": exact, "attribution": approx, "correlation": correlation(exact, approx)}
