"""ROME-style causal tracing (Meng et al. 2022) on interp's run_grid.

Corrupt the subject's token embeddings with seeded Gaussian noise (std = noise x the std of the
embedding matrix; ROME's "s3" setting is noise=3), hold `samples` noise draws as one batch of
identical prompts (the engine keys noise by (seed, item, position), so every item gets its own
draw), then restore one clean state per row and measure the target's probability:

    indirect effect(site, token) = p_restored(target) - p_corrupted(target)

States: single hidden states (`resid_post` or `resid_pre` per layer x token) and windows of
`window` consecutive MLP / attention outputs centred on each layer. The corruption is a shared op
(applied once, in the base run), so rows start from the corrupted run's cached prefix.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import interp
from interp import Noise, Patch, Result, Subject, at
from interp.metrics import prob, token_id

from .patching import layer_window

KIND_SITES = {"hidden": None, "mlp": "mlp.out", "attn": "attn.out"}


def embedding_std(lm: interp.Instrumented) -> float:
    """Standard deviation of the input embedding matrix (sigma in ROME's 3*sigma noise)."""
    get = getattr(lm.model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = lm.model.get_submodule(lm.site("embed").module)
    return float(emb.weight.detach().float().std())


@dataclass
class Trace:
    """Indirect effects per kind ("hidden", "mlp", "attn"), each a Result with axes (layer, pos)."""

    results: dict[str, Result]
    p_clean: float
    p_corrupted: float
    target: str
    subject_positions: list[int]
    stats: dict = field(default_factory=dict)

    def __getitem__(self, kind: str) -> Result:
        return self.results[kind]

    def peak(self, kind: str) -> tuple[int, str, float]:
        """(layer, token label, indirect effect) of the largest effect for one kind."""
        where, v = self.results[kind].top(1)[0]
        return where["layer"], where["pos"], v

    def save(self, folder: str | Path, prefix: str = "trace") -> dict[str, Path]:
        """Each kind as JSON + safetensors (interp.Result) and a heatmap PNG; returns the paths."""
        folder = Path(folder)
        out = {}
        for kind, res in self.results.items():
            out[f"{kind}.json"] = res.save(folder / f"{prefix}_{kind}")
            out[f"{kind}.png"] = res.plot(folder / f"{prefix}_{kind}.png", cmap="Purples" if kind == "hidden" else
                                          ("Greens" if kind == "mlp" else "Reds"), center=False,
                                          title=res.attrs.get("title"))
        return out


def _subject_positions(lm, prompt, subject) -> list[int]:
    if isinstance(subject, str):
        return lm.positions(prompt, Subject(subject, "all"))
    if isinstance(subject, Subject):
        return lm.positions(prompt, Subject(subject.text, "all"))
    return lm.positions(prompt, list(subject))


def _repeat(prompt, n: int):
    if isinstance(prompt, str):
        return [prompt] * n
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None]
        if ids.shape[0] != 1:
            raise ValueError(f"causal tracing takes one prompt; got a batch of {ids.shape[0]}")
        return ids.repeat(n, 1)
    raise TypeError(f"trace() takes a prompt string or a [1, pos] tensor of token ids, not {type(prompt).__name__}")


def seed_interval(values: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Student-t interval of the mean over axis 0 (the noise seeds); one seed gives the point itself."""
    n = values.shape[0]
    mean = values.mean(0)
    if n < 2:
        return mean.clone(), mean.clone()
    half = t_quantile(0.5 + level / 2, n - 1) * values.std(0) / n ** 0.5
    return mean - half, mean + half


def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom (q in (0.5, 1)): the CDF is integrated numerically in
    x = tan(theta), where the density is smooth for every df >= 1, then inverted by interpolation."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, not q={q}, df={df}")
    theta = torch.linspace(0, math.pi / 2, 200_001, dtype=torch.float64)[:-1]
    x = torch.tan(theta)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    dens = torch.exp(log_c - (df + 1) / 2 * torch.log1p(x * x / df)) / torch.cos(theta) ** 2
    cdf = 0.5 + torch.cat([torch.zeros(1, dtype=torch.float64),
                           torch.cumsum((dens[1:] + dens[:-1]) / 2 * (theta[1] - theta[0]), 0)])
    k = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)))
    k = min(max(k, 1), len(cdf) - 1)
    w = (q - float(cdf[k - 1])) / float(cdf[k] - cdf[k - 1])
    return float(math.tan(float(theta[k - 1]) + w * float(theta[1] - theta[0])))


def _title(prompt, target, what, p_clean, p_corr, samples, noise, sigma, seeds) -> str:
    text = prompt if isinstance(prompt, str) else "token ids"
    how = f"noise {noise:g} x emb. std" if noise is not None else f"noise std {sigma:.3g}"
    over = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    return (f"{text!r} -> {target!r}: restore {what}; p(target) clean {p_clean:.3f}, corrupted {p_corr:.3f}; "
            f"{samples} samples, {how}, {over}")


def trace(lm: interp.Instrumented, prompt, subject, target: str | int | None = None, *,
          kinds: Sequence[str] = ("hidden", "mlp", "attn"), state: str = "resid_post", window: int = 10,
          samples: int = 10, noise: float = 3.0, std: float | None = None, seed: int = 0,
          layers=None, seeds: int | Sequence[int] | None = None, level: float = 0.95, progress: bool = True,
          **grid_kw) -> Trace:
    """Causal trace of `prompt`: indirect effect of restoring each (layer, token) state.

    subject: its text in the prompt (or a list of token positions); target: the answer token
    (string, id, or None for the clean run's top token); noise: multiple of the embedding std
    (ignored when std= gives the absolute noise std); samples: noise draws held in one batch.
    seeds: None = one noise draw (seed); k = seeds seed..seed+k-1; or a list: the trace is run once per seed and
    each Result holds the mean over seeds, with attrs ci_low / ci_high (a t interval at `level` over the seeds),
    per_seed_peak and p_corrupted_per_seed.
    """
    for k in kinds:
        if k not in KIND_SITES:
            raise ValueError(f"unknown trace kind {k!r}; choose from {tuple(KIND_SITES)}")
    if state not in ("resid_post", "resid_pre"):
        raise ValueError(f"state must be 'resid_post' or 'resid_pre', not {state!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, not {samples}")
    subj = _subject_positions(lm, prompt, subject)
    sigma = std if std is not None else noise * embedding_std(lm)
    L = lm.n_layers
    layers = list(range(L)) if layers is None else list(layers)

    sites = {"hidden": [f"blocks.{l}.{state}" for l in range(L)],
             "mlp": [f"blocks.{l}.mlp.out" for l in range(L)], "attn": [f"blocks.{l}.attn.out" for l in range(L)]}
    capture = sorted({s for k in kinds for s in sites[k]})
    clean = lm.run(prompt, capture=capture, last_only=True)
    if target is None:
        tid = int(clean.logits[0, -1].argmax())
    else:
        tid = token_id(lm.tokenizer, target) if isinstance(target, str) else int(target)
    target_str = lm.tokenizer.decode([tid]) if lm.tokenizer is not None else str(tid)
    metric = prob(tid)
    p_clean = float(metric(clean.logits).mean())
    T = lm.adapter.prepare(prompt).seq_len
    tokens = clean.tokens[0] if clean.tokens else [str(i) for i in range(T)]
    labels = [f"{p}:{t}{'*' if p in subj else ''}" for p, t in enumerate(tokens)]

    corrupt = [Noise("embed", std=sigma, seed=seed, where=at(pos=subj))]
    rows, index = [], []
    for k in kinds:
        for l in layers:
            win = [l] if k == "hidden" else layer_window(l, window, L)
            site_kind = state if k == "hidden" else KIND_SITES[k]
            for p in range(T):
                rows.append([Patch(f"blocks.{j}.{site_kind}", clean.cache[f"blocks.{j}.{site_kind}"], where=at(pos=p))
                             for j in win])
                index.append(k)
    batch = _repeat(prompt, samples)
    seed_list = [seed] if seeds is None else (list(range(seed, seed + seeds)) if isinstance(seeds, int)
                                               else [int(x) for x in seeds])
    if not seed_list:
        raise ValueError("seeds must name at least one noise seed")
    per_seed, p_corrs = [], []
    for sd in seed_list:
        corrupt = [Noise("embed", std=sigma, seed=sd, where=at(pos=subj))]
        desc = "causal trace" if len(seed_list) == 1 else f"causal trace (seed {sd})"
        grid = lm.run_grid(batch, rows, metric, shared=corrupt, progress=progress, desc=desc, **grid_kw)
        p_corrs.append(float(grid.base.float().mean()))
        per_seed.append(grid.values.float().mean(1) - p_corrs[-1])
    p_corr = sum(p_corrs) / len(p_corrs)
    ies = torch.stack(per_seed)
    ie = ies.mean(0)
    lo, hi = seed_interval(ies, level)
    results, i = {}, 0
    for k in kinds:
        n = len(layers) * T
        what = {"hidden": f"single {state} state", "mlp": f"MLP outputs, window {window}",
                "attn": f"attention outputs, window {window}"}[k]
        results[k] = Result(ie[i:i + n].reshape(len(layers), T), ("layer", "pos"), {"layer": layers, "pos": labels},
                            {"metric": f"indirect effect on p({target_str!r})", "kind": k, "state": state,
                             "window": 1 if k == "hidden" else window, "p_clean": p_clean, "p_corrupted": p_corr,
                             "noise_std": sigma, "samples": samples, "seed": seed, "subject_positions": subj,
                             "seeds": seed_list, "level": level, "p_corrupted_per_seed": p_corrs,
                             "ci_low": lo[i:i + n].reshape(len(layers), T),
                             "ci_high": hi[i:i + n].reshape(len(layers), T),
                             "per_seed_peak": [float(v[i:i + n].max()) for v in per_seed],
                             "title": _title(prompt, target_str, what, p_clean, p_corr, samples, noise if std is None
                                             else None, sigma, seed_list)})
        i += n
    return Trace(results, p_clean, p_corr, target_str, subj, dict(grid.stats))
