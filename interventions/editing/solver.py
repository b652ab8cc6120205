"""One key-value solver for ROME, MEMIT and AlphaEdit on MLP down-projections.

keys   k: the projection's input at the subject's last token, averaged over a few prefixes (ROME).
values z: the residual at the last edited layer L plus a delta, optimised by gradient descent so the
          model writes the new object (NLL + KL on "{subject} is a" + weight decay, norm clamp; ROME/MEMIT).
update, per layer l of the range (MEMIT's spread: each layer takes 1/(layers left) of what is missing):
  rome      dW = R (K^T C^-1 K)^-1 K^T C^-1        exact: dW K = R, smallest change in the C-norm (rank n)
  memit     dW = R K^T (lam C + K K^T)^-1          least squares against preserved keys with second moment C
  alphaedit dW = R K^T P (K K^T P + l2 I)^-1       P projects on the null space of C: dW k0 = 0 for kept keys
W is [out, in] (Conv1D weights are transposed at the boundary, see layers.py). Every forward pass goes through
the engine (Replace at the layer output for the delta, raw-site capture for keys); no hooks of our own.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from interp import Replace
from interp.engine import subject_positions

from ..erasure.core import Edit
from .layers import EditError, Projection, down_proj
from .stats import KeyStats, key_stats

METHODS = ("rome", "memit", "alphaedit")


@dataclass(frozen=True)
class Fact:
    """A rewrite: `prompt` holds "{}" where the subject goes; `target` is the new object (with its leading space)."""

    prompt: str
    subject: str
    target: str
    old: str | None = None  # the object the model knows (evaluation only)

    def text(self) -> str:
        if "{}" not in self.prompt:
            raise EditError(f"the prompt {self.prompt!r} has no '{{}}' where the subject {self.subject!r} goes")
        return self.prompt.format(self.subject)


@dataclass
class ValueConfig:
    """Settings of the value optimisation (defaults: MEMIT's published GPT-J settings)."""

    steps: int = 25
    lr: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 0.75       # ||delta|| <= clamp * ||z_init||
    stop_nll: float = 0.05
    kl_prompt: str = "{} is a"


@dataclass
class SolverConfig:
    lam: float = 15_000.0            # MEMIT: weight of the preserved second moment
    l2: float = 10.0                 # AlphaEdit: ridge term
    null_threshold: float = 2e-2     # AlphaEdit: eigenvalues of C below this span the null space
    null_energy: float | None = None  # AlphaEdit: or the smallest eigenvectors holding this fraction of E||k||^2
    ridge: float = 1e-6              # ROME, MEMIT: C + ridge * mean eigenvalue * I (invertible from short texts)


_VALUE_DEFAULTS = ValueConfig()
_SOLVER_DEFAULTS = SolverConfig()


def _ids(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def batch_ids(seqs: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Right-padded input_ids and attention_mask (causal LMs: earlier positions are unaffected)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s))
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def last_subject_pos(tok, ids: Sequence[int], subject: str) -> int:
    """Position of the subject's last token in a token id sequence (through the engine's Subject rule)."""
    strings = [tok.decode([int(i)]) for i in ids]
    return subject_positions(strings, subject)[-1]


def prefixes(lm, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """ROME's context templates: "{}" plus n short texts sampled from the model itself (seeded)."""
    tok = lm.tokenizer
    starts = ["The", "Therefore", "Because", "I", "You", "It", "When", "In", "She", "We"]
    out = ["{}"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in starts[:n]:
            ids = torch.tensor([_ids(tok, s)])
            with torch.no_grad():
                gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, do_sample=True,
                                        top_k=5, pad_token_id=_pad_id(tok))
            text = tok.decode(gen[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(" ".join(text.split()) + ". {}")
    return out


def compute_keys(lm, proj: Projection, facts: Sequence[Fact], context: Sequence[str]) -> torch.Tensor:
    """[n_facts, d_in]: the projection's input at the subject's last token, averaged over the context templates."""
    tok = lm.tokenizer
    seqs, where = [], []
    for f in facts:
        for c in context:
            ids = _ids(tok, c.format(f.text()))
            seqs.append(ids)
            where.append(last_subject_pos(tok, ids, f.subject))
    keys = []
    for i in range(0, len(seqs), 64):
        part = seqs[i:i + 64]
        with torch.no_grad():
            k = lm.run(batch_ids(part, _pad_id(tok)), capture=[proj.key_site]).cache[proj.key_site]
        keys += [k[j, where[i + j]].double().cpu() for j in range(len(part))]
    return torch.stack(keys).reshape(len(facts), len(context), -1).mean(1)


def current_outputs(lm, site: str, facts: Sequence[Fact]) -> torch.Tensor:
    """[n_facts, d]: what `site` carries at the subject's last token of each bare prompt."""
    tok = lm.tokenizer
    seqs = [_ids(tok, f.text()) for f in facts]
    where = [last_subject_pos(tok, s, f.subject) for s, f in zip(seqs, facts)]
    out = []
    for i in range(0, len(seqs), 64):
        with torch.no_grad():
            h = lm.run(batch_ids(seqs[i:i + 64], _pad_id(tok)), capture=[site]).cache[site]
        out += [h[j, where[i + j]].double().cpu() for j in range(h.shape[0])]
    return torch.stack(out)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Parameters do not require grad inside the block (value optimisation differentiates activations only)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _value_batch(tok, facts: Sequence[Fact], context: Sequence[str], kl_prompt: str):
    """Per fact: rewrite sequences (context + prompt + target[:-1]) and one KL prompt; the rows' fact index,
    subject position, and the (row, position, token) triples the NLL reads."""
    seqs, owner, sub, nll_at, kl_rows = [], [], [], [], []
    for i, f in enumerate(facts):
        tgt = _ids(tok, f.target)
        if not tgt:
            raise EditError(f"the target {f.target!r} tokenizes to nothing")
        for c in context:
            p = _ids(tok, c.format(f.text()))
            nll_at += [(len(seqs), len(p) - 1 + j, t) for j, t in enumerate(tgt)]
            seqs.append(p + tgt[:-1])
            owner.append(i)
            sub.append(last_subject_pos(tok, p, f.subject))
        kl_ids = _ids(tok, kl_prompt.format(f.subject))
        kl_rows.append(len(seqs))
        seqs.append(kl_ids)
        owner.append(i)
        sub.append(last_subject_pos(tok, kl_ids, f.subject))
    return seqs, owner, sub, nll_at, kl_rows


def optimise_values(lm, layer: int, facts: Sequence[Fact], context: Sequence[str], z_init: torch.Tensor,
                    cfg: ValueConfig = _VALUE_DEFAULTS) -> tuple[torch.Tensor, list[dict]]:
    """One delta per fact ([n, d], added to block `layer`'s MLP output at the subject's last token) that makes the
    model say the fact's target. Facts share the batch but not their deltas: the loss is a sum of per-fact terms
    and Adam is elementwise, so this equals optimising each alone (early stop and norm clamp are per fact)."""
    tok, dev = lm.tokenizer, next(lm.model.parameters()).device
    seqs, owner, sub, nll_at, kl_rows = _value_batch(tok, facts, context, cfg.kl_prompt)
    batch = {k: v.to(dev) for k, v in batch_ids(seqs, _pad_id(tok)).items()}
    n, B = len(facts), len(seqs)
    onehot = torch.zeros(batch["input_ids"].shape, device=dev)
    onehot[torch.arange(B), torch.tensor(sub)] = 1.0
    own = torch.tensor(owner, device=dev)
    r, p, t = (torch.tensor(c, device=dev) for c in zip(*nll_at))
    kr, ks = torch.tensor(kl_rows, device=dev), torch.tensor([sub[k] for k in kl_rows], device=dev)
    delta = torch.zeros(n, z_init.shape[-1], device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    op = Replace(f"blocks.{layer}.mlp.out",
                 fn=lambda s: s + onehot[..., None].to(s.dtype) * delta[own][:, None].to(s.dtype))
    with torch.no_grad():
        base = lm.run(batch).logits[kr, ks].float().log_softmax(-1)
    norm0 = z_init.float().norm(dim=-1).to(dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    hist: list[list[float]] = [[] for _ in range(n)]
    with frozen(lm.model):
        for _ in range(cfg.steps):
            logp = lm.run(batch, ops=[op], grad=True).logits.float().log_softmax(-1)
            tok_nll = -logp[r, p, t]
            nll = torch.zeros(n, device=dev).index_add(0, own[r], tok_nll) / torch.bincount(own[r], minlength=n)
            kl = (logp[kr, ks].exp() * (logp[kr, ks] - base)).sum(-1)
            wd = cfg.weight_decay * (delta ** 2).sum(-1) / norm0 ** 2
            for i in range(n):
                if not done[i]:
                    hist[i].append(float(nll[i].detach()))
            done |= nll.detach() < cfg.stop_nll
            if bool(done.all()):
                break
            keep = delta.detach().clone()
            opt.zero_grad()
            ((nll + cfg.kl_weight * kl + wd) * (~done)).sum().backward()
            opt.step()
            with torch.no_grad():
                delta[done] = keep[done]
                scale = (cfg.clamp * norm0 / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    info = [{"nll": h, "steps": len(h), "delta_norm": float(d.norm()), "exp_neg_nll": math.exp(-h[-1])}
            for h, d in zip(hist, delta.detach())]
    return delta.detach().double().cpu(), info


def null_space(C: torch.Tensor, threshold: float, energy: float | None = None) -> tuple[torch.Tensor, dict]:
    """AlphaEdit's projector on the eigenvectors of C with eigenvalue < threshold (or, with `energy`, the smallest
    eigenvectors that together carry at most that fraction of E||k||^2), and what it kept."""
    evals, V = torch.linalg.eigh(C)  # ascending
    if energy is not None:
        small = torch.cumsum(evals.clamp_min(0), 0) <= energy * evals.clamp_min(0).sum()
    else:
        small = evals < threshold
    if not bool(small.any()):
        raise EditError(f"AlphaEdit's null space is empty: every eigenvalue of the key second moment is >= "
                        f"{threshold:g} (smallest {float(evals.min()):.3g}); raise null_threshold or null_energy")
    U = V[:, small]
    kept = float(evals[small].sum() / evals.sum().clamp_min(1e-30))
    return U @ U.T, {"null_dim": int(small.sum()), "dim": int(C.shape[0]), "energy_in_null_space": kept}


def solve_update(K: torch.Tensor, R: torch.Tensor, stats: KeyStats, method: str, cfg: SolverConfig,
                 P: torch.Tensor | None = None) -> torch.Tensor:
    """dW [out, in] for keys K [n, in] and residuals R [n, out] (all float64)."""
    K, R = K.T, R.T  # columns are facts
    C = stats.C
    if method == "rome":
        if ("inv", cfg.ridge) not in stats.null_cache:
            stats.null_cache[("inv", cfg.ridge)] = torch.linalg.inv(stats.regularised(cfg.ridge))
        Ci = stats.null_cache[("inv", cfg.ridge)]
        A = Ci @ K                                        # [in, n]
        return R @ torch.linalg.solve(K.T @ A, A.T)       # R (K^T C^-1 K)^-1 K^T C^-1
    if method == "memit":
        return torch.linalg.solve(cfg.lam * stats.regularised(cfg.ridge) + K @ K.T, K @ R.T).T
    if method == "alphaedit":
        eye = torch.eye(C.shape[0], dtype=C.dtype)
        X = torch.linalg.solve(P @ (K @ K.T) + cfg.l2 * eye, P @ K @ R.T)  # lies in range(P)
        return X.T
    raise EditError(f"unknown editing method {method!r}; choose one of {METHODS}")


@dataclass
class Targets:
    """Optimised values for a list of facts at layer `layer`: z = residual + delta at the subject's last token."""

    layer: int
    facts: list
    deltas: torch.Tensor      # [n, d_model]
    z: torch.Tensor           # [n, d_model] target residual after block `layer`
    info: list = field(default_factory=list)


def compute_targets(lm, facts: Sequence[Fact], layer: int, context: Sequence[str] | None = None,
                    cfg: ValueConfig = _VALUE_DEFAULTS, progress: bool = True, chunk: int = 8) -> Targets:
    """Optimise one delta per fact at block `layer` (shareable by every method whose last layer is `layer`)."""
    context = list(context) if context is not None else prefixes(lm)
    z0 = current_outputs(lm, f"blocks.{layer}.resid_post", facts)
    deltas, info = [], []
    for i in tqdm(range(0, len(facts), chunk), desc="values", disable=not progress):
        d, inf = optimise_values(lm, layer, facts[i:i + chunk], context, z0[i:i + chunk], cfg)
        deltas.append(d)
        info += inf
    D = torch.cat(deltas)
    return Targets(layer, list(facts), D, z0 + D, info)


def _check_request(lm, facts: Sequence[Fact], method: str, layers: Sequence[int]) -> list[int]:
    if method not in METHODS:
        raise EditError(f"unknown editing method {method!r}; choose one of {METHODS}")
    if not facts:
        raise EditError("no facts to edit: pass a list of Fact(prompt, subject, target)")
    layers = sorted(int(l) for l in layers)
    if not layers:
        raise EditError("layers= is empty: name the block(s) whose MLP down-projection is edited")
    if method == "rome" and len(layers) != 1:
        raise EditError(f"ROME edits one layer, got layers={layers}; use method='memit' to spread over a range")
    if getattr(lm, "tokenizer", None) is None:
        raise EditError("editing needs the model's tokenizer: attach(model, tokenizer=...)")
    for f in facts:
        f.text()
    return layers


def _write(model: torch.nn.Module, proj: Projection, W: torch.Tensor) -> None:
    param = proj.module(model).weight
    with torch.no_grad():
        param.copy_(proj.stored(W.to(param.dtype)))


def edit(lm, facts: Sequence[Fact], method: str = "memit", layers: Sequence[int] = (4,), *,
         targets: Targets | None = None, stats: dict[int, KeyStats] | None = None, text="licenses",
         n_tokens: int = 20_000, seed: int = 0, context: Sequence[str] | None = None,
         value_cfg: ValueConfig = _VALUE_DEFAULTS, solver_cfg: SolverConfig = _SOLVER_DEFAULTS,
         progress: bool = True) -> Edit:
    """Rewrite `facts` in the MLP down-projections of `layers`; returns an Edit (new weights), model left as it was.

    Apply it with `edit.apply(model)`, write it with interventions.checkpoint.write_checkpoint(model, dest, edit).
    `targets` (from compute_targets at the last layer) and `stats` (from key_stats) may be shared between calls."""
    from interp import attach

    lm = attach(lm)
    layers = _check_request(lm, facts, method, layers)
    t0 = time.perf_counter()
    projs = [down_proj(lm, l) for l in layers]
    stats = dict(stats or {})
    missing = [p for p in projs if p.layer not in stats]
    if missing:
        stats.update(key_stats(lm, missing, text, n_tokens, seed=seed, progress=progress))
    context = list(context) if context is not None else prefixes(lm, seed=seed)
    t1 = time.perf_counter()
    if targets is None:
        targets = compute_targets(lm, facts, layers[-1], context, value_cfg, progress)
    if targets.layer != layers[-1] or [f.text() for f in targets.facts] != [f.text() for f in facts]:
        raise EditError(f"targets were computed at layer {targets.layer} for other facts; MEMIT needs them at the "
                        f"last edited layer {layers[-1]} for these facts (compute_targets(lm, facts, {layers[-1]}))")
    t2 = time.perf_counter()
    model = lm.model
    originals = {p.layer: p.weight(model).detach().clone() for p in projs}
    per_layer, tensors = [], {}
    try:
        for i, p in enumerate(projs):
            per_layer.append(_edit_layer(lm, p, facts, context, targets, stats[p.layer], method, solver_cfg,
                                         len(projs) - i))
        tensors = {p.weight_name: p.module(model).weight.detach().clone() for p in projs}
    finally:
        for p in projs:
            _write(model, p, originals[p.layer])
    t3 = time.perf_counter()
    info = {"facts": [asdict(f) for f in facts], "n_facts": len(facts), "edit_layers": layers,
            "value_config": asdict(value_cfg), "solver_config": asdict(solver_cfg), "context_templates": context,
            "key_statistics": {str(l): {k: v for k, v in s.record.items()} for l, s in stats.items() if l in layers},
            "values": targets.info, "per_layer": per_layer,
            "seconds": {"stats_and_context": t1 - t0, "values": t2 - t1, "solve": t3 - t2}}
    concept = "; ".join(f"{f.text()} ->{f.target}" for f in facts[:5]) + (" ..." if len(facts) > 5 else "")
    lam = solver_cfg.lam if method == "memit" else (solver_cfg.l2 if method == "alphaedit" else None)
    return Edit(method=method, concept=concept, tensors=tensors, lam=lam, layers=[p.path for p in projs], info=info)


def _edit_layer(lm, p: Projection, facts, context, targets: Targets, stats: KeyStats, method: str,
                cfg: SolverConfig, layers_left: int) -> dict:
    """Solve and write (in place) one layer's update; returns how well it met its share of the residual."""
    K = compute_keys(lm, p, facts, context)
    cur = current_outputs(lm, f"blocks.{targets.layer}.resid_post", facts)
    R = (targets.z - cur) / layers_left
    extra = {}
    P = None
    if method == "alphaedit":
        key = (cfg.null_threshold, cfg.null_energy)
        if key not in stats.null_cache:
            stats.null_cache[key] = null_space(stats.C, cfg.null_threshold, cfg.null_energy)
        P, extra = stats.null_cache[key]
    dW = solve_update(K, R, stats, method, cfg, P)
    W = p.weight(lm.model).detach()
    _write(lm.model, p, W.double() + dW.to(W.device))
    miss = float((K @ dW.T - R).norm() / R.norm().clamp_min(1e-30))
    return {"layer": p.layer, "module": p.path, "update_norm": float(dW.norm()), "relative_miss": miss,
            "update_rank": int(torch.linalg.matrix_rank(dW.float()).item()), **extra}
