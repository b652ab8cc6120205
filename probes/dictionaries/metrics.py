"""How good a dictionary is: explained variance, L0, dead fraction, and the model's loss when spliced.

    explained variance = 1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2     (over rows)
    L0                 = mean number of non-zero features per row
    dead fraction      = share of features that never fire on the evaluation rows
    CE recovered       = (CE_zero - CE_spliced) / (CE_zero - CE_clean)       next-token cross-entropy of the LM
                         with the site zero-ablated, replaced by the reconstruction (no error term), and clean
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .sae import Dictionary
from .splice import splice


@torch.no_grad()
def reconstruction(sae: Dictionary, X: torch.Tensor, Y: torch.Tensor | None = None, batch: int = 8192) -> dict:
    """Explained variance, MSE, L0, dead fraction and per-feature firing frequency on rows X (targets Y)."""
    Y = X if Y is None else Y
    sse, n, l0 = 0.0, 0, 0.0
    fires = torch.zeros(sae.d_sae, dtype=torch.long)
    mean = Y.float().mean(0)
    tot = float((Y.float() - mean).pow(2).sum())
    for i in range(0, X.shape[0], batch):
        x = X[i:i + batch].float()
        f = sae.encode(x)
        y_hat = sae.reconstruct(x, f)
        sse += float((Y[i:i + batch].float() - y_hat.float()).pow(2).sum())
        on = f > 0
        l0 += float(on.sum())
        fires += on.sum(0).cpu()
        n += x.shape[0]
    return {"explained_variance": 1 - sse / max(tot, 1e-30), "mse": sse / (n * Y.shape[-1]), "l0": l0 / n,
            "dead_fraction": float((fires == 0).float().mean()), "frequency": (fires.float() / n), "rows": n}


def _ce(logits: torch.Tensor, ids: torch.Tensor, skip_first: int) -> tuple[float, int]:
    lg = logits[:, skip_first:-1].float()
    tgt = ids[:, skip_first + 1:].to(lg.device)
    return float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="sum")), tgt.numel()


@torch.no_grad()
def ce_recovered(lm, sae: Dictionary, batches: Iterable[torch.Tensor], site: str | None = None,
                 skip_first: int = 1) -> dict:
    """Next-token cross-entropy (nats/token) clean, spliced (reconstruction, no error term), with the error term
    (must equal clean), and zero-ablated; CE recovered = (zero - spliced) / (zero - clean).
    `batches`: [B, T] token-id tensors; predictions from the first `skip_first` positions are not scored."""
    import interp

    lm = interp.attach(lm)
    site = site or sae.cfg.site
    tot = {"clean": 0.0, "spliced": 0.0, "error_term": 0.0, "zero": 0.0}
    n = 0
    for ids in batches:
        runs = {"clean": [], "spliced": [splice(sae, site, error=False)], "error_term": [splice(sae, site, error=True)],
                "zero": [interp.Ablate(site, mode="zero")]}
        for name, ops in runs.items():
            s, k = _ce(lm.run(ids, ops=ops).logits, ids, skip_first)
            tot[name] += s
        n += k
    out = {k: v / n for k, v in tot.items()}
    out["ce_recovered"] = (out["zero"] - out["spliced"]) / (out["zero"] - out["clean"])
    out["tokens"] = n
    return out


__all__ = ["reconstruction", "ce_recovered"]
