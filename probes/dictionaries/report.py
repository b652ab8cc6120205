"""Feature reports: top-activating contexts (tokens highlighted), logit effects of decoder directions, density.

    ctx = top_contexts(sae, rows, windows, tokenizer, features=[12, 40], k=10)   # from store rows
    eff = logit_effects(lm, sae, [12, 40], k=10)                                 # Result (feature, rank)
    den = density(sae, rows["blocks.15.resid_post"]); den.plot_hist("density.png")
    write_html(ctx, eff, "features.html")

Logit effect of feature i: the decoder direction d_i pushed through the model's unembedding as the last block's
output would be, W_U (g * d_i) with g the final norm's weight (the norm's scale is left out, so the numbers
rank tokens for one feature; they are not probabilities).
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import interp
from interp.results import Result

from .sae import Dictionary


@dataclass
class Context:
    feature: int
    value: float
    item: int
    pos: int
    tokens: list[str]        # the window around the token
    focus: int               # index of the activating token inside `tokens`
    acts: list[float] = field(default_factory=list)  # the feature's activation on each shown token (if known)

    def text(self, mark: str = "«»") -> str:
        return "".join(f"{mark[0]}{t}{mark[1]}" if i == self.focus else t for i, t in enumerate(self.tokens))


@torch.no_grad()
def feature_matrix(sae: Dictionary, X: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Feature activations of rows X [N, d] -> [N, d_sae] (float32)."""
    return torch.cat([sae.encode(X[i:i + batch].float()) for i in range(0, X.shape[0], batch)])


def top_contexts(sae: Dictionary, rows: dict[str, torch.Tensor], windows: torch.Tensor, tokenizer,
                 features: Sequence[int], k: int = 10, before: int = 12, after: int = 3,
                 site: str | None = None, F: torch.Tensor | None = None) -> dict[int, list[Context]]:
    """The k rows where each feature fires most, shown as token windows of the store's input items.
    `rows`: a store's tensors (site rows + 'item' and 'pos'); `windows`: the [n_items, T] ids they came from."""
    site = site or sae.cfg.site
    F = feature_matrix(sae, rows[site]) if F is None else F
    out: dict[int, list[Context]] = {}
    for j in features:
        col = F[:, j]
        vals, idx = col.topk(min(k, col.numel()))
        ctxs = []
        for v, r in zip(vals.tolist(), idx.tolist()):
            if v <= 0:
                break
            item, pos = int(rows["item"][r]), int(rows["pos"][r])
            lo, hi = max(0, pos - before), min(windows.shape[1], pos + after + 1)
            toks = [tokenizer.decode([int(t)]) for t in windows[item, lo:hi]]
            ctxs.append(Context(j, v, item, pos, toks, pos - lo))
        out[j] = ctxs
    return out


@torch.no_grad()
def logit_effects(lm, sae: Dictionary, features: Sequence[int], k: int = 10) -> Result:
    """Top-k tokens each decoder direction promotes: Result (feature, rank) of logit effects, tokens in attrs."""
    lm = interp.attach(lm)
    ad = lm.adapter
    head = ad.model.get_submodule(ad.head)
    W = sae.directions()[list(features)].to(head.weight.dtype)
    if getattr(ad, "final", None):
        g = getattr(ad.model.get_submodule(ad.final), "weight", None)
        if g is not None:
            W = W * g
    eff = head(W.to(head.weight.device)).float().cpu()
    vals, idx = eff.topk(k, dim=-1)
    low_vals, low_idx = eff.topk(k, dim=-1, largest=False)
    tok = lambda i: lm.tokenizer.decode([int(i)]) if lm.tokenizer is not None else str(int(i))
    return Result(vals, ("feature", "rank"), {"feature": list(features), "rank": list(range(k))},
                  {"metric": "logit effect of the unit decoder direction", "tokens": [[tok(i) for i in r] for r in idx],
                   "token_ids": idx.tolist(), "bottom_tokens": [[tok(i) for i in r] for r in low_idx],
                   "bottom_values": low_vals.tolist()})


def density(sae: Dictionary, X: torch.Tensor | None = None, F: torch.Tensor | None = None) -> Result:
    """Firing frequency of every feature (Result (feature,)); attrs hold the log10 histogram."""
    F = feature_matrix(sae, X) if F is None else F
    freq = (F > 0).float().mean(0)
    logf = freq.clamp_min(1e-10).log10()
    edges = torch.linspace(-10, 0, 41)
    hist = torch.histc(logf, bins=40, min=-10, max=0)
    return Result(freq, ("feature",), {}, {"metric": "firing frequency", "rows": int(F.shape[0]),
                                           "dead": int((freq == 0).sum()), "hist_edges": edges.tolist(),
                                           "hist_counts": hist.tolist()})


def plot_density(res: Result, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 firing frequency (dead features shown in the leftmost bar, labelled)."""
    from interp.results import figure, save_figure

    freq = res.values.float()
    live = freq[freq > 0].log10()
    fig = figure(6, 3.5)
    ax = fig.subplots()
    ax.hist(live.numpy(), bins=40, color="tab:blue")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("features")
    ax.set_title((title + "\n" if title else "") + f"{freq.numel()} features, {res.attrs['rows']} rows, "
                 f"dead (never fired) = {int((freq == 0).sum())}", fontsize=8)
    return save_figure(fig, path)


def write_html(contexts: dict[int, list[Context]], effects: Result | None, path: str | Path, title: str = "") -> Path:
    """One HTML page: per feature its top contexts (activating token highlighted) and top / bottom logit tokens."""
    esc = html.escape
    parts = [f"<html><head><meta charset='utf-8'><title>{esc(title)}</title><style>mark{{background:#fc6}}"
             "body{font-family:sans-serif;font-size:13px} .c{font-family:monospace;white-space:pre-wrap}</style>"
             f"</head><body><h2>{esc(title)}</h2>"]
    feats = list(contexts)
    for j in feats:
        parts.append(f"<h3>feature {j}</h3>")
        if effects is not None and j in effects.coord("feature"):
            r = effects.coord("feature").index(j)
            up = ", ".join(esc(repr(t)) for t in effects.attrs["tokens"][r])
            down = ", ".join(esc(repr(t)) for t in effects.attrs["bottom_tokens"][r])
            parts.append(f"<p>promotes: {up}<br>suppresses: {down}</p>")
        for c in contexts[j]:
            body = "".join(f"<mark>{esc(t)}</mark>" if i == c.focus else esc(t) for i, t in enumerate(c.tokens))
            parts.append(f"<div class='c'>{c.value:7.2f} | {body}</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def consistent_features(contexts: dict[int, list[Context]], min_share: float = 0.6) -> list[tuple[int, str, float]]:
    """Features whose top contexts mostly activate on one token string: (feature, token, share), best first."""
    out = []
    for j, cs in contexts.items():
        if len(cs) < 3:
            continue
        toks = [c.tokens[c.focus].strip().lower() for c in cs]
        best = max(set(toks), key=toks.count)
        share = toks.count(best) / len(toks)
        if share >= min_share and best:
            out.append((j, best, share))
    return sorted(out, key=lambda t: -t[2])


__all__ = ["Context", "feature_matrix", "top_contexts", "logit_effects", "density", "plot_density", "write_html",
           "consistent_features"]
