"""Steering vectors: extract a direction from contrasting activations, inject it with the engine's Add op.

Extraction (docs/METHODS.md, "Steering"): difference of means (optionally z-normalising each example
first), CAA (mean of paired positive - negative differences) and the first principal component of
the paired differences. Activations come from prompts, from datasets of model inputs or from
tensors already captured. Injection is `Add(site, vector, alpha, norm="relative")`:
h' = h + alpha * v * ||h|| / ||v||, at chosen positions, only generated tokens, or only inside a
window of denoising / rollout steps, for token sequences and (spatial="average" | "keep") grids.
`SteeringVector.apply` keeps the op on every forward call inside a `with` block, so it works in HF
`generate`, a diffusers pipeline and a physics rollout loop. Every dose-response is measured beside
a random direction and a norm-matched control (the same extraction on shuffled labels).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import interp
from interp import Add, Result, at
from interp import collect as _collector
from interp import io as _io
from interp.direction import EPS, FORMAT, Direction, znormalize  # noqa: F401  (FORMAT, znormalize: old names)
from interp.errors import InterpError, SiteShapeError

METHODS = ("mean_diff", "caa", "pca")
REDUCE = ("last", "mean", "keep")
_VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_diffusers_version",
             "_attn_implementation_autoset", "_attn_implementation", "name_or_path")
_SAMPLE = 64  # parameter values per sampled tensor in a model's identity


class ModelMismatchError(InterpError, ValueError):
    """A steering vector recorded on one model is applied to another."""


# ---------------------------------------------------------------------------------------------
# which model a vector belongs to
# ---------------------------------------------------------------------------------------------

def _modules(model: Any) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(model, torch.nn.Module):
        return [("", model)]
    comps = getattr(model, "components", None) or {}
    return [(k, m) for k, m in sorted(comps.items()) if isinstance(m, torch.nn.Module)]


def _config(m: torch.nn.Module) -> Any:
    cfg = getattr(m, "config", None)
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else (dict(cfg) if isinstance(cfg, dict) else None)
    return {k: v for k, v in d.items() if k not in _VOLATILE} if d is not None else None


def model_identity(model: Any) -> dict:
    """What identifies a model for its steering vectors: `arch`, a fingerprint of its class, config and
    parameter names / shapes (dtype and device excluded), and `sample`, a few of its weights (64 evenly
    spaced values of its first and last two parameter tensors), which tell two models of one architecture
    apart (another seed, a fine-tune) and survive a change of dtype to within its rounding."""
    mods = _modules(model)
    if not mods:
        return {}
    layout, params = [], []
    for prefix, m in mods:
        named = [(n, p) for n, p in m.named_parameters() if p.is_floating_point() and p.numel()]
        layout.append((prefix, type(m).__name__, _config(m), [(n, tuple(p.shape)) for n, p in named]))
        params += [p for _, p in named]
    picked = params[:2] + params[-2:] if len(params) > 4 else params
    sample = []
    for p in picked:
        flat = p.detach().reshape(-1)
        # float64: float32 overshoots the last index
        idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLE, flat.numel()), dtype=torch.float64).long()
        idx = idx.to(flat.device)
        sample += flat[idx].double().cpu().tolist()
    return {"arch": _io.fingerprint(layout, length=16), "sample": sample}


def same_model(a: dict, b: dict) -> str | None:
    """None when identities a and b name one model, else why not (a short phrase)."""
    if a.get("arch") != b.get("arch"):
        return f"another architecture or config (fingerprint {a.get('arch')} vs {b.get('arch')})"
    x = torch.tensor(a.get("sample", []), dtype=torch.float64)
    y = torch.tensor(b.get("sample", []), dtype=torch.float64)
    if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-2, atol=1e-2 * float(x.abs().max().clamp_min(1e-12))):
        return "the same architecture with other weights"
    return None


# ---------------------------------------------------------------------------------------------
# the value object
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SteeringVector(Direction):
    """A Direction (interp.direction) that checks and injects itself as a steering vector.

    vector: [F] for token sites (added per position) or spatial="average" grids (per location);
    the item's full shape for spatial="keep". model / identity / method / data_hash / meta are
    provenance; save / load are Direction's (one file format).
    """

    method: str = "mean_diff"

    _noun = "steering vector"

    def check(self, lm: interp.Instrumented, force: bool = False) -> None:
        """ModelMismatchError unless this vector was recorded on `lm`'s model (same architecture, config and
        weights) or force=True. A vector without an identity (made from bare tensors) is not checked."""
        if force or not self.identity:
            return
        why = same_model(self.identity, model_identity(lm.model))
        if why is not None:
            raise ModelMismatchError(f"the steering vector for {self.site!r} was recorded on {self.model or 'a model'} "
                                     f"and this is {why}: extract it on this model, or pass force=True")

    def op(self, alpha: float = 1.0, *, norm: str | None = "relative", pos: Any = None, steps=None,
           items=None) -> Add:
        """The engine op that injects this vector: Add(site, vector, alpha, norm, where=...). The op itself
        does not know the model: `apply`, `generate` and `lm_target_prob` check it with `check`."""
        _finite_alpha(alpha)
        if self.spatial is not None and pos is not None:
            raise ValueError(
                f"a spatial={self.spatial!r} vector is added at every location; pos={pos!r} cannot be used"
            )
        return Add(self.site, self.vector, alpha=float(alpha), norm=norm, spatial=self.spatial,
                   where=at(pos=pos, steps=steps, items=items))

    def apply(self, lm: interp.Instrumented, alpha: float = 1.0, *, norm: str | None = "relative", pos: Any = None,
              steps=None, items=None, steps_from: str | None = None, check: bool = True, force: bool = False):
        """Context manager: the vector is added on every forward call of `lm`'s model inside the block.

        pos: None (all positions), "generated" (tokens after the prompt), ints / slices / Tokens.
        steps: a (start, stop) window or list of step indices, counted by calls of `steps_from`
        (default: the denoiser of an attached diffusers pipeline, else the model itself), so
        `with sv.apply(attach(pipe), 0.5, steps=(2, 6)): pipe(...)` steers steps 2-5 of a plain
        pipeline call (classifier-free guidance batched into one denoiser call per step).
        force=True applies a vector recorded on another model (see `check`).
        """
        self.check(lm, force)
        if steps is not None and steps_from is None:
            steps_from = getattr(lm.adapter, "denoiser", "")
        return lm.applied([self.op(alpha, norm=norm, pos=pos, steps=steps, items=items)], steps_from=steps_from,
                          check=check)


# ---------------------------------------------------------------------------------------------
# extraction maths (model-free)
# ---------------------------------------------------------------------------------------------

def _check_pair(pos: torch.Tensor, neg: torch.Tensor, paired: bool) -> None:
    if pos.shape[1:] != neg.shape[1:]:
        raise SiteShapeError(f"positive activations have feature shape {tuple(pos.shape[1:])}, negative "
                             f"{tuple(neg.shape[1:])}: capture both at the same site with the same reduction")
    if min(len(pos), len(neg)) < 1:
        raise ValueError("need at least one positive and one negative example")
    if paired and len(pos) != len(neg):
        raise ValueError(f"paired methods (caa, pca) need as many positive as negative examples, got "
                         f"{len(pos)} and {len(neg)}; use method='mean_diff' for unpaired sets")


def direction(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff", znorm: bool = False) -> torch.Tensor:
    """Steering direction from activations [n, *F] of the positive and negative sets (float32 result).

    mean_diff: mean(pos) - mean(neg); caa: mean of paired differences (equal to mean_diff for equal
    sets, kept for its paired bookkeeping); pca: first principal axis of the paired differences
    (uncentred, so a shared shift is the signal), signed and scaled to the mean projection.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    _check_pair(pos, neg, method != "mean_diff")
    p, n = (znormalize(pos), znormalize(neg)) if znorm else (pos.double(), neg.double())
    if method == "mean_diff":
        d = p.mean(0) - n.mean(0)
    elif method == "caa":
        d = (p - n).mean(0)
    else:
        diffs = (p - n).flatten(1)
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        u = vh[0]
        proj = diffs @ u
        if proj.mean() < 0:
            u, proj = -u, -proj
        d = (u * proj.mean()).reshape(p.shape[1:])
    return d.float()


def shuffled_direction(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff", znorm: bool = False,
                       seed: int = 0) -> torch.Tensor:
    """The same extraction with the labels shuffled (paired methods: random swaps within pairs)."""
    g = torch.Generator().manual_seed(seed)
    if method == "mean_diff":
        both = torch.cat([pos, neg])
        perm = torch.randperm(len(both), generator=g)
        return direction(both[perm[:len(pos)]], both[perm[len(pos):]], method, znorm)
    swap = torch.rand(len(pos), generator=g) < 0.5
    shape = (-1,) + (1,) * (pos.dim() - 1)
    p = torch.where(swap.reshape(shape), neg, pos)
    n = torch.where(swap.reshape(shape), pos, neg)
    return direction(p, n, method, znorm)


def data_hash(*parts: Any) -> str:
    """sha256 (16 hex) of prompts / tensors / nested lists that define a steering data set."""
    return _io.fingerprint(*parts, length=16)


def _finite_alpha(alpha: Any) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise InterpError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a):
        raise InterpError(f"alpha must be finite, got {alpha!r}: NaN / inf would make every activation NaN")
    return a


# ---------------------------------------------------------------------------------------------
# activations from a model
# ---------------------------------------------------------------------------------------------

def collect(lm: interp.Instrumented, inputs: Any, site: str, *, reduce: str = "last", batch_size: int = 16,
            progress: bool = False, **run_kw) -> torch.Tensor:
    """Activations at `site` for every example of `inputs`: [n, F] (reduce "last" / "mean" / a position
    index / the mean over a slice of positions) or [n, ...] ("keep").

    inputs: prompts (padded per batch; exact for causal LMs, "last" = each prompt's own last token),
    a tensor / tuple / dict of model inputs with the batch first, or an iterable of such batches.
    On channels-first grids ([n, C, *S]) "mean" averages the spatial axes.
    """
    return _collect(lm, inputs, site, reduce, batch_size, progress, **run_kw)[0]


def _collect(lm, inputs, site, reduce, batch_size, progress, **run_kw) -> tuple[torch.Tensor, int]:
    if isinstance(reduce, bool) or (reduce not in REDUCE and not isinstance(reduce, (int, slice))):
        raise ValueError(f"reduce must be one of {REDUCE}, a position index or a slice of positions, not {reduce!r}")
    shapes: dict = {}
    try:
        x = _collector.collect(lm, inputs, site, None if reduce == "keep" else reduce, batch_size=batch_size,
                               progress=progress, shapes=shapes, **run_kw)[site]
    except SiteShapeError as e:
        raise ValueError(f"reduce={reduce!r}: {e}") from None
    return x, len(shapes[site])


def from_activations(pos: torch.Tensor, neg: torch.Tensor, site: str, *, method: str = "mean_diff",
                     znorm: bool = False, spatial: str | None = None, model: str = "", meta: dict | None = None,
                     hash_of: Any = None) -> SteeringVector:
    """A SteeringVector from cached activations [n, *F] of both sets."""
    d = direction(pos, neg, method, znorm)
    info = {"n_pos": len(pos), "n_neg": len(neg), "znorm": znorm, **(meta or {})}
    return SteeringVector(d, site, method, info, model=model, spatial=spatial,
                          data_hash=data_hash(hash_of if hash_of is not None else (pos, neg), method, znorm))


def extract(lm: interp.Instrumented, positive: Any, negative: Any, site: str, *, method: str = "mean_diff",
            reduce: str = "last", znorm: bool = False, model: str = "", batch_size: int = 16,
            return_activations: bool = False, **run_kw):
    """Steering vector at `site` from positive / negative prompts or model inputs.

    reduce: "last" / "mean" over positions gives a per-position vector [F] (for grids, "mean"
    averages the spatial axes: spatial="average"); "keep" keeps the full shape (spatial="keep").
    With return_activations=True returns (vector, pos_acts, neg_acts) for controls.
    """
    p, raw_dim = _collect(lm, positive, site, reduce, batch_size, False, **run_kw)
    n, _ = _collect(lm, negative, site, reduce, batch_size, False, **run_kw)
    spatial = "keep" if reduce == "keep" else ("average" if raw_dim >= 4 else None)
    hashed = (positive, negative) if _collector.is_text(positive) and _collector.is_text(negative) else (p, n)
    sv = replace(from_activations(p, n, site, method=method, znorm=znorm, spatial=spatial, model=model,
                                  meta={"reduce": reduce}, hash_of=hashed), identity=model_identity(lm.model))
    return (sv, p, n) if return_activations else sv


def controls(vector: SteeringVector, pos: torch.Tensor | None = None, neg: torch.Tensor | None = None,
             seed: int = 0) -> dict[str, SteeringVector]:
    """The steering vector beside its controls, both with its norm: "random", an isotropic random
    direction; "norm_matched" (given the activations), the same extraction on shuffled labels with
    its component along the steering vector removed: an in-distribution direction of the data's
    own activation subspace that carries none of the contrast."""
    out = {"steer": vector, "random": vector.random_like(seed)}
    if pos is not None and neg is not None:
        znorm = bool(vector.meta.get("znorm", False))
        method = vector.method if vector.method in METHODS else "mean_diff"
        d = shuffled_direction(pos, neg, method, znorm, seed).double()
        v = vector.vector.double()
        d = (d - (d * v).sum() / (v * v).sum().clamp_min(EPS) * v).float()
        sv = replace(
            vector, vector=d, method="shuffled", meta={**vector.meta, "control": "shuffled labels", "seed": seed}
        )
        out["norm_matched"] = sv.rescaled(vector.norm)
    return out


# ---------------------------------------------------------------------------------------------
# dose-response
# ---------------------------------------------------------------------------------------------

def monotonicity(values: Sequence[float], alphas: Sequence[float]) -> dict[str, float | bool]:
    """Spearman rank correlation of metric vs alpha, and whether the metric is strictly monotone."""
    a = torch.as_tensor(list(alphas), dtype=torch.float64)
    v = torch.as_tensor(list(values), dtype=torch.float64)
    order = torch.argsort(a)
    v = v[order]
    d = v[1:] - v[:-1]

    def ranks(x):
        r = torch.empty_like(x)
        r[torch.argsort(x)] = torch.arange(len(x), dtype=torch.float64)
        return r
    ra, rv = ranks(a[order]), ranks(v)
    rho = float(torch.corrcoef(torch.stack([ra, rv]))[0, 1]) if len(v) > 1 and rv.std() > 0 else 0.0
    return {"spearman": rho, "increasing": bool((d > 0).all()), "decreasing": bool((d < 0).all()),
            "monotone": bool((d > 0).all() or (d < 0).all()), "change": float(v[-1] - v[0])}


def dose_response(vectors: dict[str, SteeringVector], alphas: Sequence[float],
                  measure: Callable[[SteeringVector, float], Any],
                  *, metric: str = "metric", progress: bool = True, extra: Sequence[str] = ()) -> Result:
    """Generic sweep: `measure(vector, alpha)` -> a float, or a dict with `metric` (and `extra` keys).

    Returns a Result with axes (vector, alpha) [, quantity]; attrs hold the monotonicity summary.
    """
    names = list(vectors)
    qty = [metric, *extra]
    vals = torch.full((len(names), len(alphas), len(qty)), float("nan"), dtype=torch.float64)
    bar = tqdm(total=len(names) * len(alphas), desc="alpha sweep", disable=not progress, leave=False)
    try:
        for i, name in enumerate(names):
            for j, a in enumerate(alphas):
                got = measure(vectors[name], float(a))
                got = got if isinstance(got, dict) else {metric: got}
                for k, q in enumerate(qty):
                    vals[i, j, k] = float(got[q])
                bar.update(1)
    finally:
        bar.close()
    res = Result(vals if extra else vals[..., 0], ("vector", "alpha", "quantity") if extra else ("vector", "alpha"),
                 {"vector": names, "alpha": [float(a) for a in alphas], **({"quantity": qty} if extra else {})},
                 {"metric": metric})
    res.attrs["monotonicity"] = {n: monotonicity(vals[i, :, 0].tolist(), alphas) for i, n in enumerate(names)}
    res.attrs["vectors"] = {n: {"site": v.site, "method": v.method, "norm": v.norm, "data_hash": v.data_hash,
                                "cosine_to_steer": v.cosine(vectors[names[0]])} for n, v in vectors.items()}
    return res


def lm_target_prob(lm: interp.Instrumented, vectors: dict[str, SteeringVector], prompts: Sequence[str],
                   targets: Sequence[str], alphas: Sequence[float], *, pos: Any = slice(1, None),
                   norm: str | None = "relative", progress: bool = True, force: bool = False) -> Result:
    """Probability mass of the `targets` words as the next token after each prompt, per (vector, alpha),
    averaged over prompts. One run_grid per prompt: rows = vectors x alphas, sharing the prefix below the site.

    pos defaults to every position but the first (whose activation norm in Llama-style models is an
    attention-sink outlier that norm-relative scaling would blow up).
    """
    from interp.metrics import token_id

    for v in vectors.values():
        v.check(lm, force)
    ids = torch.tensor([token_id(lm.tokenizer, w) for w in targets])
    names = list(vectors)
    rows = [[vectors[n].op(a, norm=norm, pos=pos)] for n in names for a in alphas]
    metric = lambda logits: logits[:, -1].float().softmax(-1)[:, ids].sum(-1)
    acc = torch.zeros(len(rows), dtype=torch.float64)
    for p in tqdm(prompts, desc="target prob", disable=not progress, leave=False):
        g = lm.run_grid(p, rows, metric, progress=False)
        acc += g.values.double().mean(1).cpu()
    vals = (acc / len(prompts)).reshape(len(names), len(alphas))
    res = Result(vals, ("vector", "alpha"), {"vector": names, "alpha": [float(a) for a in alphas]},
                 {"metric": "p(target words)", "targets": list(targets), "n_prompts": len(prompts)})
    res.attrs["monotonicity"] = {n: monotonicity(vals[i].tolist(), alphas) for i, n in enumerate(names)}
    res.attrs["vectors"] = {n: {"site": v.site, "method": v.method, "norm": v.norm, "data_hash": v.data_hash,
                                "cosine_to_steer": v.cosine(vectors[names[0]])} for n, v in vectors.items()}
    return res


def generate(lm: interp.Instrumented, prompt: str, vector: SteeringVector | None = None, alpha: float = 0.0, *,
             pos: Any = "generated", max_new_tokens: int = 20, norm: str | None = "relative", force: bool = False,
             **gen_kw) -> dict:
    """Greedy HF `generate` with the vector applied (or none): {'text', 'ids', 'scores'}."""
    model, tok = lm.model, lm.tokenizer
    enc = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **gen_kw)
    with (vector.apply(lm, alpha, norm=norm, pos=pos, force=force) if vector is not None else contextlib.nullcontext()):
        out = model.generate(**enc, **kw)
    new = out.sequences[0, enc["input_ids"].shape[1]:]
    return {"text": tok.decode(new, skip_special_tokens=True), "ids": out.sequences[0],
            "scores": torch.stack(out.scores, 1)[0]}


def plot_dose_response(res: Result, path: str | Path, title: str = "", quantity: str | None = None,
                       xlabel: str = "alpha (norm-relative)") -> Path:
    """Line plot: metric vs alpha, one line per vector (steer / random / norm_matched)."""
    from interp.results import figure, save_figure

    r = res.sel(quantity=quantity) if quantity is not None and "quantity" in res.axes else res
    if "quantity" in r.axes:
        r = r.sel(quantity=r.coord("quantity")[0])
    fig = figure(5, 3.4)
    ax = fig.subplots()
    alphas = r.coord("alpha")
    styles = {"steer": dict(color="C3", lw=2, marker="o"), "random": dict(color="C0", ls="--", marker="s"),
              "norm_matched": dict(color="C2", ls=":", marker="^")}
    for i, name in enumerate(r.coord("vector")):
        ax.plot(alphas, r.values[i].float().numpy(), label=name, **styles.get(name, dict(marker=".")))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(quantity or res.attrs.get("metric", "metric"))
    ax.set_title(title or res.attrs.get("title", ""), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = ["SteeringVector", "direction", "shuffled_direction", "znormalize", "data_hash", "collect",
           "from_activations", "extract", "controls", "monotonicity", "dose_response", "lm_target_prob",
           "generate", "plot_dose_response", "model_identity", "same_model", "ModelMismatchError"]
