"""Lenses: read every layer's residual stream through the model's own head.

    res = logit_lens(lm, "The Eiffel Tower is in the city of")        # Result (layer, pos): top-1 probability
    res.attrs["top_tokens"][layer][pos]; plot_lens(res, "lens.png")
    tl = train_tuned_lens(lm, store)                                   # store of blocks.*.resid_post rows
    res = logit_lens(lm, prompt, tuned=tl); tl.save("tuned"); TunedLens.load("tuned")

Logit lens (nostalgebraist 2020): logits_l = head(final_norm(h_l)) for the residual stream h_l after block l.
Tuned lens (Belrose et al. 2023): logits_l = head(final_norm(h_l + A_l h_l + b_l)), one affine translator per
layer, initialised at zero (= the logit lens) and trained to minimise KL(p_final || p_l) on stored activations.
The last layer's lens is the model itself. Both use the adapter's `tail` (final norm + head, softcap included).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import interp
from interp.errors import InterpError
from interp.results import Result, atomic_write

FORMAT = "interp.tuned_lens/1"


class LensError(InterpError, ValueError):
    """A lens cannot run on this model or these activations."""


def _tail(lm):
    tail = getattr(lm.adapter, "tail", None)
    if tail is None or not getattr(lm.adapter, "block_paths", None):
        raise LensError(f"{lm.adapter.describe()} has no final-norm + head path (adapter.tail): lenses need a "
                        "language model with a head")
    return tail


def resid_sites(lm) -> list[str]:
    return [f"blocks.{i}.resid_post" for i in range(lm.n_layers)]


class TunedLens(nn.Module):
    """One affine translator h -> h + A h + b per layer (zero-initialised: the logit lens)."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.b = nn.Parameter(torch.zeros(n_layers, d_model))

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        hf = h.float()
        return (hf + hf @ self.A[layer].T + self.b[layer]).to(h.dtype)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        atomic_write(p / "lens.safetensors", lambda f: save_file({"A": self.A.detach().contiguous(),
                                                                  "b": self.b.detach().contiguous()}, str(f)))
        meta = json.dumps({"format": FORMAT, "n_layers": self.A.shape[0], "d_model": self.A.shape[1]})
        atomic_write(p / "lens.json", lambda f: Path(f).write_text(meta))
        return p

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        from safetensors.torch import load_file

        p = Path(path)
        meta = json.loads((p / "lens.json").read_text())
        if meta.get("format") != FORMAT:
            raise LensError(f"{p} is not a tuned lens (format {meta.get('format')!r})")
        lens = cls(meta["n_layers"], meta["d_model"])
        lens.load_state_dict(load_file(str(p / "lens.safetensors")))
        return lens


@torch.no_grad()
def layer_logits(lm, hiddens: dict[str, torch.Tensor], tuned: TunedLens | None = None) -> torch.Tensor:
    """[n_layers, B, T, V] logits of each layer's residual stream."""
    tail = _tail(lm)
    out = []
    for i, name in enumerate(resid_sites(lm)):
        h = hiddens[name]
        if tuned is not None and i < lm.n_layers - 1:
            h = tuned(h, i)
        out.append(tail(h, False).float())
    return torch.stack(out)


def logit_lens(lm, prompt, tuned: TunedLens | None = None, item: int = 0) -> Result:
    """Per layer and position: the top-1 token and its probability; attrs hold the tokens, the KL to the final
    layer (nats) and the log-probability of the model's own final prediction."""
    lm = interp.attach(lm)
    run = lm.run(prompt, capture=resid_sites(lm))
    logits = layer_logits(lm, run.cache, tuned)[:, item]          # [L, T, V]
    logp = logits.log_softmax(-1)
    top_p, top_i = logp.exp().max(-1)
    final = logp[-1]
    kl = (final.exp() * (final - logp)).sum(-1)                     # [L, T]
    own = logp.gather(-1, final.argmax(-1)[None, :, None].expand(logp.shape[0], -1, 1))[..., 0]
    tok = lambda i: lm.tokenizer.decode([int(i)]) if lm.tokenizer is not None else str(int(i))
    tokens = run.tokens[item] if run.tokens else [str(i) for i in range(logits.shape[1])]
    kind = "tuned lens" if tuned is not None else "logit lens"
    return Result(top_p, ("layer", "pos"),
                  {"layer": list(range(lm.n_layers)), "pos": [f"{i}:{t}" for i, t in enumerate(tokens)]},
                  {"metric": "top-1 probability", "lens": kind, "prompt": prompt if isinstance(prompt, str) else None,
                   "top_tokens": [[tok(i) for i in row] for row in top_i], "kl_to_final": kl.tolist(),
                   "logp_final_top": own.tolist(), "title": f"{kind}: {prompt!r}" if isinstance(prompt, str) else kind})


def plot_lens(res: Result, path: str | Path, max_layers: int = 40) -> Path:
    """Heatmap (layer x position) of the top-1 probability, each cell labelled with its top token."""
    from interp.results import figure, save_figure

    v = res.values.float()
    L, T = v.shape
    step = max(1, -(-L // max_layers))
    rows = list(range(0, L, step)) + ([L - 1] if (L - 1) % step else [])
    fig = figure(max(5, 0.9 * T + 2), max(3, 0.32 * len(rows) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(v[rows].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for r, layer in enumerate(rows):
        for c in range(T):
            t = res.attrs["top_tokens"][layer][c]
            ax.text(c, r, repr(t)[1:-1][:8], ha="center", va="center", fontsize=6,
                    color="white" if v[layer, c] < 0.5 else "black")
    ax.set_xticks(range(T), res.coord("pos"), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [str(res.coord("layer")[r]) for r in rows], fontsize=7)
    ax.set_xlabel("position: input token")
    ax.set_ylabel("layer (resid_post)")
    fig.colorbar(im, ax=ax, label=res.attrs.get("metric", "top-1 probability"))
    ax.set_title(res.attrs.get("title", ""), fontsize=9)
    return save_figure(fig, path)


def train_tuned_lens(lm, store, steps: int = 300, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                     layers: Sequence[int] | None = None, progress: bool = True) -> TunedLens:
    """Fit the translators on a store holding every `blocks.{i}.resid_post` (KL to the model's final
    distribution, which is the tail of the last block's output). `layers` limits training to some layers."""
    lm = interp.attach(lm)
    tail = _tail(lm)
    names = resid_sites(lm)
    missing = [n for n in names if n not in store.sites]
    if missing:
        raise LensError(f"the store lacks {missing[:3]}...: fill it with sites 'blocks.*.resid_post'")
    d = store.tensors(1)[names[0]].shape[-1]
    lens = TunedLens(lm.n_layers, d)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    todo = list(layers) if layers is not None else list(range(lm.n_layers - 1))
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    bar = tqdm(total=steps, desc="interp tuned lens", disable=not progress)
    it, done, epoch = iter(store.batches(batch_size, seed=seed)), 0, 0
    try:
        while done < steps:
            try:
                b = next(it)
            except StopIteration:
                epoch += 1
                it = iter(store.batches(batch_size, seed=seed + epoch))
                continue
            with torch.no_grad():
                target = tail(b[names[-1]].float()[:, None], False)[:, 0].float().log_softmax(-1)
            loss = 0.0
            for i in todo:
                lp = tail(lens(b[names[i]].float()[:, None], i), False)[:, 0].float().log_softmax(-1)
                loss = loss + (target.exp() * (target - lp)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            (loss / len(todo)).backward()
            opt.step()
            done += 1
            bar.update(1)
            bar.set_postfix(kl=f"{float(loss.detach()) / len(todo):.3f}")
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
    return lens.eval()


@torch.no_grad()
def lens_kl(lm, rows: dict[str, torch.Tensor], tuned: TunedLens | None = None) -> list[float]:
    """Mean KL(p_final || p_layer) per layer on stored rows (nats)."""
    lm = interp.attach(lm)
    tail = _tail(lm)
    names = resid_sites(lm)
    target = tail(rows[names[-1]].float()[:, None], False)[:, 0].float().log_softmax(-1)
    out = []
    for i, n in enumerate(names):
        h = rows[n].float()[:, None]
        if tuned is not None and i < len(names) - 1:
            h = tuned(h, i)
        lp = tail(h, False)[:, 0].float().log_softmax(-1)
        out.append(float((target.exp() * (target - lp)).sum(-1).mean()))
    return out


__all__ = ["logit_lens", "plot_lens", "TunedLens", "train_tuned_lens", "lens_kl", "layer_logits", "resid_sites",
           "LensError"]
