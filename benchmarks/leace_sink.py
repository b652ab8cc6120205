"""LEACE on a residual stream with an attention sink: SmolLM2 blocks.20.resid_post, every token of 24 prompts
on two topics. Prints the spectrum's top, the in-sample logistic loss of a fresh probe before / after erasure
beside H(z), and the cross-covariance, for the numerical-rank cutoff (default) and for the old 1e-6-relative
cutoff (now refused by the guarantee check, whose message carries the residual).

    PYTHONPATH=. python benchmarks/leace_sink.py
"""
from __future__ import annotations

import torch

import interp
from interp.zoo import load
from interventions.erasure import ErasureGuaranteeError, LeaceEraser

ANIMALS = ["The cat sat on the warm mat", "A dog ran across the field", "The horse ate fresh hay",
           "Birds sang in the old tree", "The cow grazed near the barn", "A fox hid in the bushes",
           "The sheep followed the shepherd", "Two rabbits dug a small hole", "The owl hunted at night",
           "A goat climbed the steep rock", "The duck swam across the pond", "A wolf howled at the moon"]
MACHINES = ["The car drove down the highway", "A train left the busy station", "The plane landed at noon",
            "Trucks carried steel to the port", "The bus stopped at the corner", "A bike leaned on the wall",
            "The ship sailed into the harbor", "Two engines roared at the track", "The tractor plowed the land",
            "A rocket launched into orbit", "The van parked near the shop", "A crane lifted the heavy beam"]
SITE = "blocks.20.resid_post"


def in_sample_loss(x: torch.Tensor, z: torch.Tensor, iters: int = 300) -> float:
    """The smallest mean logistic loss a linear probe reaches on (x, z) (whitened features, LBFGS)."""
    evals, V = torch.linalg.eigh(torch.cov(x.T))
    keep = evals > 1e-10 * evals.max()
    a = (x - x.mean(0)) @ (V[:, keep] / evals[keep].sqrt())
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, z.double())
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, z.double()))


def main() -> None:
    torch.set_num_threads(1)
    lm = interp.attach(load("smollm2"))
    xs, zs = [], []
    with torch.no_grad():
        for label, prompts in ((0, ANIMALS), (1, MACHINES)):
            for p in prompts:
                act = lm.run(p, capture=[SITE]).cache[SITE][0].double()
                xs.append(act)
                zs.append(torch.full((act.shape[0],), label))
    x, z = torch.cat(xs), torch.cat(zs)
    ev = torch.linalg.eigvalsh(torch.cov(x.T))
    h = float(torch.distributions.Bernoulli(probs=z.double().mean()).entropy())
    zc = (z.double() - z.double().mean())[:, None]
    cross = lambda t: float(((t - t.mean(0)) * zc).mean(0).norm())  # noqa: E731
    print(f"{SITE}: {tuple(x.shape)} rows, top eigenvalue {ev[-1]:.3g}, second {ev[-2]:.3g}, H(z) {h:.4f}")
    print(f"before: probe loss {in_sample_loss(x, z):.4f}, cross-covariance {cross(x):.4g}")
    er = LeaceEraser.fit(x, z)
    ex = er(x)
    print(f"numerical-rank cutoff: probe loss {in_sample_loss(ex, z):.4f}, cross-covariance {cross(ex):.3g}")
    try:
        LeaceEraser.fit(x, z, tol=1e-6)
        print("1e-6-relative cutoff: accepted")
    except ErasureGuaranteeError as e:
        print(f"1e-6-relative cutoff: refused: {e}")


if __name__ == "__main__":
    main()
