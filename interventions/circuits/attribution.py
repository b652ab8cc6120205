"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG), scores for every edge.

    score(s -> r) = sum over items, positions of (out_s(clean) - out_s(corrupted)) . dm/d(input of r)

divided by the number of items. EAP takes the gradient on the corrupted run (one clean forward, one
corrupted forward + backward). EAP-IG averages it over n points between the runs: over the inputs (the
block-0 input interpolated, all n steps in one batched forward/backward when `steps_per_pass` allows),
or over activations (each layer's senders interpolated in turn, the others left to the run).

The gradient at a receiver's input is taken through interp ops (a Replace adding a zero tensor held by
autograd at the q/k/v projection output, the MLP input and the last block's output) and carried back
through the projection weights and the receiver's own norm, each head separately, so a head's q input is
its own copy of the residual stream, as in TransformerLens's split q/k/v inputs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

import interp
from interp import Replace

from .graph import CircuitArgumentError, Parts

Metric = Callable[[torch.Tensor], torch.Tensor]


class _Probes:
    """Zero tensors added at the receivers' sites during one run; their gradients after backward."""

    def __init__(self, parts: Parts):
        self.parts = parts
        self.deltas: dict[str, torch.Tensor] = {}
        sites = []
        for l in range(parts.L):
            sites += sorted({parts.proj_site(l, c) for c in "qkv"}) + [parts.mlp_in_site(l)]
        self.sites = sites + [f"blocks.{parts.L - 1}.resid_post"]

    def ops(self) -> list[Replace]:
        def probe(site):
            def fn(sel):
                d = torch.zeros_like(sel, requires_grad=True)
                self.deltas[site] = d
                return sel + d
            return fn
        return [Replace(s, fn=probe(s)) for s in self.sites]

    def grads(self, m: torch.Tensor) -> dict[str, torch.Tensor]:
        names = list(self.deltas)
        gs = torch.autograd.grad(m.sum(), [self.deltas[n] for n in names], allow_unused=True)
        return {n: (torch.zeros_like(self.deltas[n]) if g is None else g) for n, g in zip(names, gs)}


def _norm_vjp(norm, x: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """d/dx of <norm(x), cot>; x [N, T, d] broadcast over cot's extra head axis [N, T, n, d] when given."""
    if cot.dim() == x.dim() + 1:
        x = x[:, :, None].expand(*cot.shape)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(norm(x), x, cot.to(x.dtype))
    return g


def receiver_grads(parts: Parts, grads: dict, cache) -> torch.Tensor:
    """[R, N, T, d] dm/d(input of every receiver) in graph order, from the probes' gradients."""
    out = []
    for l in range(parts.L):
        for c in "qkv":
            W, _ = parts.proj_weight(l, c)
            g = parts.heads_of(grads[parts.proj_site(l, c)], c)  # [N, T, n, dh]
            cot = torch.einsum("ntge,ged->ntgd", g, W.to(g.dtype))
            out.append(_norm_vjp(parts.ln1(l), cache[f"blocks.{l}.resid_pre"], cot).permute(2, 0, 1, 3))
        g = grads[parts.mlp_in_site(l)]
        out.append(_norm_vjp(parts.ln2(l), cache[f"blocks.{l}.resid_mid"], g)[None])
    out.append(grads[f"blocks.{parts.L - 1}.resid_post"][None])
    return torch.cat(out)


def _grad_run(parts: Parts, inputs, metric: Metric, extra_ops=()) -> tuple[torch.Tensor, object]:
    probes = _Probes(parts)
    run = parts.lm.run(inputs, ops=[*extra_ops, *probes.ops()], capture=parts.capture_sites(), last_only=True,
                       grad=True)
    grads = probes.grads(metric(run.logits).float())
    cache = {k: v.detach() for k, v in run.cache.items()}
    return receiver_grads(parts, grads, cache), cache


def _scores(parts: Parts, delta: torch.Tensor, G, b: int) -> torch.Tensor:
    """Edge scores [E] from sender deltas [S, b, T, d] and receiver gradients [R, b, T, d] (or, for EAP-IG
    over activations, a dict sender layer -> the receiver gradients of that layer's pass)."""
    g = parts.graph
    if isinstance(G, dict):
        s_layer = torch.tensor(g.sender_layer)
        full = torch.zeros(len(g.senders), len(g.receivers), dtype=torch.float64)
        for lay, Gl in G.items():
            m = s_layer == lay
            full[m] = torch.einsum("sbtd,rbtd->sr", delta[m].double(), Gl.double())
        full /= b
    else:
        full = torch.einsum("sbtd,rbtd->sr", delta.double(), G.double()) / b
    return full[g.src, g.dst].float()


def _mean_steps(G: torch.Tensor, n: int, b: int) -> torch.Tensor:
    return G.reshape(G.shape[0], n, b, *G.shape[2:]).mean(1)


def eap(lm_or_parts, clean, corrupted, metric: Metric, *, method: str = "eap", steps: int = 5,
        steps_per_pass: int | None = None) -> interp.Result:
    """Scores of every edge: method "eap", "eap-ig" (integrated gradients over the inputs) or "eap-ig-act"
    (over each layer's activations). Result axes ("edge",), coordinates the MIB edge names."""
    parts = lm_or_parts if isinstance(lm_or_parts, Parts) else Parts(lm_or_parts)
    if method not in ("eap", "eap-ig", "eap-ig-act"):
        raise CircuitArgumentError(f"method must be 'eap', 'eap-ig' or 'eap-ig-act', not {method!r}")
    if steps < 1:
        raise CircuitArgumentError(f"steps must be >= 1, got {steps}")
    lm = parts.lm
    with torch.no_grad():
        c_cache = lm.run(clean, capture=parts.capture_sites(), last_only=True).cache
    if method == "eap":  # the corrupted run with gradients also gives the corrupted outputs
        G, x_cache = _grad_run(parts, corrupted, metric)
        parts.check(x_cache)
        passes = 1
    else:
        with torch.no_grad():
            x_cache = lm.run(corrupted, capture=parts.capture_sites(), last_only=True).cache
        parts.check(x_cache)
        fn = _ig_inputs if method == "eap-ig" else _ig_activations
        G, passes = fn(parts, corrupted, metric, c_cache, x_cache, steps, steps_per_pass)
    with torch.no_grad():
        delta = parts.sender_outputs(c_cache) - parts.sender_outputs(x_cache)
    b = delta.shape[1]
    scores = _scores(parts, delta, G, b)
    attrs = {"method": method, "steps": steps if method != "eap" else 1, "metric": getattr(metric, "name", "metric"),
             "forward_backward_passes": passes, "batch": b,
             "direction": "denoising: (clean - corrupted) . gradient; positive = toward the clean behaviour"}
    return interp.Result(scores, ("edge",), {"edge": parts.graph.edge_names}, attrs)


def _chunks(steps: int, per: int | None) -> list[list[int]]:
    per = per or steps
    ks = list(range(1, steps + 1))
    return [ks[i:i + per] for i in range(0, steps, per)]


def _ig_inputs(parts, corrupted, metric, clean_cache, corr_cache, steps, per):
    """Right Riemann sum over alpha = k/n, k = 1..n, of the receivers' gradients with the block-0 input
    set to corrupted + alpha * (clean - corrupted); the steps of a chunk are rows of one batch."""
    prep = parts.lm.adapter.prepare(corrupted)
    b = prep.batch
    x0, x1 = corr_cache["blocks.0.resid_pre"], clean_cache["blocks.0.resid_pre"]
    total, passes = None, 0
    for ks in _chunks(steps, per):
        alphas = torch.tensor([k / steps for k in ks], dtype=x0.dtype, device=x0.device)
        interp_in = (x0[None] + alphas[:, None, None, None] * (x1 - x0)[None]).reshape(-1, *x0.shape[1:])
        op = Replace("blocks.0.resid_pre", fn=lambda sel, v=interp_in: v.to(sel.dtype))
        G, _ = _grad_run(parts, prep.repeat(len(ks)), metric, [op])
        G = _mean_steps(G, len(ks), b) * len(ks)
        total = G if total is None else total + G
        passes += 1
    return total / steps, passes


def _ig_activations(parts, corrupted, metric, clean_cache, corr_cache, steps, per):
    """For each sender layer (input, then each block's heads and MLP) in turn: its outputs set to
    corrupted + alpha * (clean - corrupted), gradients averaged over alpha = k/n at the receivers;
    edges from that layer take those gradients."""
    prep = parts.lm.adapter.prepare(corrupted)
    b = prep.batch
    G_by_layer, passes = {}, 0
    for lay in range(-1, parts.L):
        names = ["blocks.0.resid_pre"] if lay < 0 else [f"blocks.{lay}.attn.z", f"blocks.{lay}.mlp.out"]
        total = None
        for ks in _chunks(steps, per):
            alphas = torch.tensor([k / steps for k in ks])
            ops = []
            for n in names:
                x0, x1 = corr_cache[n], clean_cache[n]
                a = alphas.to(x0.dtype).reshape(-1, *([1] * x0.dim()))
                v = (x0[None] + a * (x1 - x0)[None]).reshape(-1, *x0.shape[1:])
                ops.append(Replace(n, fn=lambda sel, v=v: v.to(sel.dtype)))
            G, _ = _grad_run(parts, prep.repeat(len(ks)), metric, ops)
            G = _mean_steps(G, len(ks), b) * len(ks)
            total = G if total is None else total + G
            passes += 1
        G_by_layer[lay] = total / steps
    return G_by_layer, passes
