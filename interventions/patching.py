"""Activation patching sweeps on top of interp's run_grid.

Denoising (default): run the corrupted input and write in the clean activation at one site and
position per row; noising: run the clean input and write in the corrupted activation. The effect
is normalised so that 0 = the base run's metric and 1 = the other run's metric.

Sweep kinds: `resid_pre`, `resid_mid`, `resid_post`, `attn.out`, `mlp.out` per (layer, position),
optionally over a window of consecutive layers patched at once (`window=`); attention heads
(`blocks.{l}.attn.z`, query heads, so grouped-query models are covered) over all positions
(`head_sweep`) or per (head, position) (`head_sweep(..., by_position=True)`).

Cells whose patched values equal the base run's values bit for bit (positions before the first
token where the prompts differ) are exact no-ops: they take the base metric without a forward.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import interp
from interp import Patch, Result, at
from interp.adapters.base import PromptLengthError
from interp.metrics import kl_to, logit_diff, normalized, prob

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")
METRICS = ("logit_diff", "prob", "kl")


def _runs(lm: interp.Instrumented, clean, corrupted, direction: str):
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    return (clean, corrupted) if direction == "denoise" else (corrupted, clean)


def layer_window(layer: int, window: int, n_layers: int) -> list[int]:
    """The `window` consecutive layers centred on `layer`, clipped at the ends (ROME's convention)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 layer, not {window}")
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def make_metric(name: str, lm: interp.Instrumented, clean, target: int | str | None = None,
                foil: int | str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """'logit_diff' (target - foil), 'prob' (of target) or 'kl' (KL of the clean next-token
    distribution to the run's); token strings are converted with the model's tokenizer."""
    from interp.metrics import token_id

    def tid(t):
        return token_id(lm.tokenizer, t) if isinstance(t, str) else t
    if name == "logit_diff":
        if target is None or foil is None:
            raise ValueError("metric 'logit_diff' needs target= and foil= tokens")
        return logit_diff(tid(target), tid(foil))
    if name == "prob":
        if target is None:
            raise ValueError("metric 'prob' needs target=")
        return prob(tid(target))
    if name == "kl":
        return kl_to(lm.run(clean, last_only=True).logits[:, -1].float())
    raise ValueError(f"unknown metric {name!r}; choose one of {METRICS} or pass a callable")


def _labels(tokens: Sequence[str] | None, positions: Sequence[int]) -> list[str]:
    return [f"{p}:{tokens[p]}" if tokens else str(p) for p in positions]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def _sweep(lm, clean, corrupted, cells, metric, *, direction, normalize, progress, desc, skip_equal, grid_kw):
    """cells: list of [(site, where_kw)] (one list of patches per row) -> (values [n_cells], attrs, tokens)."""
    _check_lengths(lm, clean, corrupted)
    source_input, base_input = _runs(lm, clean, corrupted, direction)
    sites = sorted({s for cell in cells for s, _ in cell})
    shared = list(grid_kw.get("shared", ()))
    source = lm.run(source_input, capture=sites, last_only=True)
    metric = metric or (lambda logits: logits[:, -1].float().max(-1).values)
    skip = [False] * len(cells)
    if skip_equal and _may_agree(lm, source_input, base_input):
        base = lm.run(base_input, ops=shared, capture=sites, last_only=True)
        for i, cell in enumerate(cells):
            skip[i] = all(_equal(_select(source.cache[s], w), _select(base.cache[s], w)) for s, w in cell)
    rows = [[Patch(s, source.cache[s], where=at(**w)) for s, w in cell] for cell, sk in zip(cells, skip) if not sk]
    grid = lm.run_grid(base_input, rows, metric, progress=progress, desc=desc, **grid_kw)
    base_metric = grid.base.float().mean()
    vals = torch.full((len(cells),), float(base_metric))
    if rows:
        vals[torch.tensor([not s for s in skip])] = grid.values.float().reshape(len(rows), -1).mean(1).cpu()
    source_metric = metric(source.logits).float().mean()
    if normalize:
        vals = normalized(vals, source_metric, base_metric)
    clean_m, corrupt_m = (source_metric, base_metric) if direction == "denoise" else (base_metric, source_metric)
    stats = dict(grid.stats, skipped_cells=sum(skip), rows=len(cells))
    attrs = {"direction": direction, "normalized": normalize, "clean_metric": float(clean_m),
             "corrupted_metric": float(corrupt_m), "metric": "normalised effect" if normalize else "metric",
             "grid": stats}
    tokens = grid.tokens[0] if grid.tokens else (source.tokens[0] if source.tokens else None)
    return vals, attrs, tokens


def _check_lengths(lm, clean, corrupted) -> None:
    """Patching compares positions one to one: clean and corrupted must have the same number of tokens."""
    pc, pk = lm.adapter.prepare(clean), lm.adapter.prepare(corrupted)
    if pc.seq_len != pk.seq_len:
        raise PromptLengthError(
            f"clean and corrupted inputs have different token lengths (clean {pc.seq_len}, corrupted {pk.seq_len}): "
            "patching compares positions one to one; rephrase them to the same number of tokens")


def _may_agree(lm, a, b) -> bool:
    """False when two token-id inputs differ at every position (then no activation can be equal)."""
    pa, pb = lm.adapter.prepare(a), lm.adapter.prepare(b)
    ia, ib = pa.kwargs.get("input_ids"), pb.kwargs.get("input_ids")
    if ia is None or ib is None or ia.shape != ib.shape:
        return True
    return bool((ia == ib).any())


def _select(t: torch.Tensor, w: dict) -> torch.Tensor:
    pos, heads = w.get("pos"), w.get("heads")
    if pos is not None:
        t = t[:, [pos] if isinstance(pos, int) else list(pos)]
    if heads is not None:
        t = t[:, :, [heads] if isinstance(heads, int) else list(heads)]
    return t


def _check_kind(lm, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown sweep kind {kind!r}; choose one of {KINDS} (attention heads: head_sweep)")
    if f"blocks.0.{kind}" not in lm.adapter.site_table():
        raise ValueError(f"this model has no {kind!r} sites (e.g. 'blocks.0.{kind}'); see `interp sites MODEL`")


def patch_sweep(lm: interp.Instrumented, clean, corrupted, kind: str = "resid_pre",
                metric: Callable[[torch.Tensor], torch.Tensor] | None = None, *, direction: str = "denoise",
                layers=None, positions=None, window: int = 1, normalize: bool = True, progress: bool = True,
                skip_equal: bool = True, **grid_kw) -> Result:
    """Patch `blocks.{l}.{kind}` at every (layer, position): Result with axes (layer, pos).

    metric maps logits [batch, pos, vocab] to one value per item; the result holds the mean over
    the base batch of the (normalised) metric after each patch. window > 1 patches the window of
    consecutive layers centred on l (clipped at the ends) at once.
    """
    _check_kind(lm, kind)
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    T = lm.adapter.prepare(clean).seq_len
    positions = list(range(T)) if positions is None else lm.positions(clean, positions)
    cells = [[(f"blocks.{j}.{kind}", {"pos": p}) for j in layer_window(l, window, lm.n_layers)]
             for l in layers for p in positions]
    vals, attrs, tokens = _sweep(lm, clean, corrupted, cells, metric, direction=direction, normalize=normalize,
                                 progress=progress, desc=f"patch {kind}", skip_equal=skip_equal, grid_kw=grid_kw)
    attrs.update(kind=kind, window=window)
    return Result(vals.reshape(len(layers), len(positions)), ("layer", "pos"),
                  {"layer": layers, "pos": _labels(tokens, positions)}, attrs)


def head_sweep(lm: interp.Instrumented, clean, corrupted, metric: Callable | None = None, *,
               by_position: bool = False, direction: str = "denoise", layers=None, positions=None,
               normalize: bool = True, progress: bool = True, skip_equal: bool = True, **grid_kw) -> Result:
    """Patch each attention head's output (`blocks.{l}.attn.z`, per query head) over all positions:
    axes (layer, head); with by_position=True, per (head, position): axes (layer, head, pos)."""
    if "blocks.0.attn.z" not in lm.adapter.site_table():
        raise ValueError("this model has no per-head site 'blocks.0.attn.z'; see `interp sites MODEL`")
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    H = lm.site("blocks.0.attn.z").heads or lm.site("blocks.0.attn.z").meta.get("heads")
    if H is None:
        H = lm.capture(clean, "blocks.0.attn.z")["blocks.0.attn.z"].shape[2]
    T = lm.adapter.prepare(clean).seq_len
    if by_position:
        positions = list(range(T)) if positions is None else lm.positions(clean, positions)
        cells = [[(f"blocks.{l}.attn.z", {"pos": p, "heads": h})] for l in layers for h in range(H) for p in positions]
    else:
        if positions is not None:
            raise ValueError("positions= applies to head_sweep(by_position=True); without it every position is patched")
        cells = [[(f"blocks.{l}.attn.z", {"heads": h})] for l in layers for h in range(H)]
    vals, attrs, tokens = _sweep(lm, clean, corrupted, cells, metric, direction=direction, normalize=normalize,
                                 progress=progress, desc="patch heads", skip_equal=skip_equal, grid_kw=grid_kw)
    attrs.update(kind="attn.z", by_position=by_position)
    if by_position:
        return Result(vals.reshape(len(layers), H, len(positions)), ("layer", "head", "pos"),
                      {"layer": layers, "head": list(range(H)), "pos": _labels(tokens, positions)}, attrs)
    return Result(vals.reshape(len(layers), H), ("layer", "head"), {"layer": layers, "head": list(range(H))}, attrs)


def sweep_all(lm: interp.Instrumented, clean, corrupted, metric: Callable | None = None, *,
              kinds: Sequence[str] = KINDS, heads: bool = True, **kw) -> dict[str, Result]:
    """Every sweep kind the model has, plus the per-head sweep: {kind: Result}."""
    out = {}
    for kind in kinds:
        if f"blocks.0.{kind}" in lm.adapter.site_table():
            out[kind] = patch_sweep(lm, clean, corrupted, kind, metric, **kw)
    if heads and "blocks.0.attn.z" in lm.adapter.site_table():
        kw.pop("window", None)
        kw.pop("positions", None)
        out["attn.z"] = head_sweep(lm, clean, corrupted, metric, **kw)
    return out


# -- many prompt pairs -------------------------------------------------------------------------------------------
def pair_sweep(lm: interp.Instrumented, pairs, kind: str = "resid_pre", metric="logit_diff", *,
               direction: str = "denoise", layers=None, window: int = 1, level: float = 0.95, n_boot: int = 2000,
               seed: int = 0, progress: bool = True, **grid_kw) -> Result:
    """Patching over a dataset of prompt pairs (a list, a .csv / .jsonl file or `pairs.from_template(...)`), each
    with its own answer: the mean per-item normalised effect with a bootstrap confidence interval.

    kind: a residual / sublayer kind (axes layer x pos: every pair must have the same token length) or "attn.z"
    (axes layer x head: lengths may differ between pairs). metric: "logit_diff" (target - foil), "prob" (of
    target) or a callable metric(logits, answers) -> [N] that gets each row's answer ids (interventions.pairs).
    Result.attrs: ci_low / ci_high (same shape as the values), level, n_items, per_item_clean / _corrupted."""
    from . import pairs as P

    items = P.load_pairs(pairs)
    answers = P.answer_ids(lm.tokenizer, items)
    fn = P.ITEM_METRICS.get(metric) if isinstance(metric, str) else metric
    if fn is None:
        raise ValueError(f"unknown pair metric {metric!r}; choose one of {list(P.ITEM_METRICS)} or pass "
                         "metric(logits, answers)")
    if metric == "logit_diff" and "foil" not in answers:
        raise ValueError("metric 'logit_diff' needs a foil in every pair (or use metric='prob')")
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    groups = _length_groups(lm, items, by_position=kind != "attn.z")
    if kind == "attn.z":
        H = lm.capture(items[0].clean, "blocks.0.attn.z")["blocks.0.attn.z"].shape[2]
        cells = [[(f"blocks.{l}.attn.z", {"heads": h})] for l in layers for h in range(H)]
        axes, coords = ("layer", "head"), {"layer": layers, "head": list(range(H))}
    else:
        _check_kind(lm, kind)
        T = next(iter(groups))
        cells = [[(f"blocks.{j}.{kind}", {"pos": p}) for j in layer_window(l, window, lm.n_layers)]
                 for l in layers for p in range(T)]
        axes = ("layer", "pos")
    effects = torch.zeros(len(items), len(cells), dtype=torch.float64)
    clean_m, corr_m, tokens = torch.zeros(len(items)), torch.zeros(len(items)), None
    for idx in groups.values():
        sub = [items[i] for i in idx]
        ans = {k: v[idx] for k, v in answers.items()}
        vals, src, base, tokens = _item_sweep(lm, [p.clean for p in sub], [p.corrupted for p in sub], cells,
                                              P.per_item(fn, ans), direction, progress, f"patch {kind} (pairs)",
                                              grid_kw)
        denom = src - base
        if bool((denom.abs() < 1e-12).any()):
            bad = [idx[i] for i in torch.nonzero(denom.abs() < 1e-12).flatten().tolist()]
            raise ValueError(f"pairs {bad}: clean and corrupted metrics are equal, so the normalised effect is "
                             "undefined; drop them or choose a metric on which they differ")
        effects[idx] = ((vals - base) / denom).T.double()
        clean_m[idx], corr_m[idx] = (src, base) if direction == "denoise" else (base, src)
    mean, lo, hi = P.bootstrap_ci(effects, level, n_boot, seed)
    shape = (len(layers), -1)
    if kind != "attn.z":
        coords = {"layer": layers, "pos": [f"{p}:{t}" for p, t in enumerate(tokens)]}
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    attrs = {"kind": kind, "direction": direction, "window": window, "metric": f"mean normalised {name}",
             "n_items": len(items), "level": level, "ci_low": lo.reshape(shape).float(),
             "ci_high": hi.reshape(shape).float(), "per_item_clean": clean_m, "per_item_corrupted": corr_m,
             "title": f"{kind} patching over {len(items)} pairs (e.g. {items[0].clean!r} -> {items[0].corrupted!r}): "
                      f"mean normalised {name}, {level:.0%} bootstrap CI in the report"}
    return Result(mean.reshape(shape).float(), axes, coords, attrs)


def _length_groups(lm, items, by_position: bool) -> dict[int, list[int]]:
    """Item indices by token length; each pair's prompts must have equal lengths (and, by position, all pairs)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(items):
        a, b = lm.adapter.prepare(p.clean).seq_len, lm.adapter.prepare(p.corrupted).seq_len
        if a != b:
            raise PromptLengthError(f"pair {i}: clean {p.clean!r} has {a} tokens, corrupted {p.corrupted!r} {b}; "
                                    "patching compares positions one to one")
        groups.setdefault(a, []).append(i)
    if by_position and len(groups) > 1:
        raise PromptLengthError(f"pairs have different token lengths ({sorted(groups)}): a layer x position map needs "
                                "one length; use a template of fixed length, or kind='attn.z' (no positions)")
    return groups


def _item_sweep(lm, clean: list, corrupted: list, cells, metric, direction, progress, desc, grid_kw):
    """cells on a batch of items -> (values [n_cells, B], source metric [B], base metric [B], tokens of item 0)."""
    source_input, base_input = _runs(lm, clean, corrupted, direction)
    sites = sorted({s for cell in cells for s, _ in cell})
    source = lm.run(source_input, capture=sites, last_only=True)
    rows = [[Patch(s, source.cache[s], where=at(**w)) for s, w in cell] for cell in cells]
    grid = lm.run_grid(base_input, rows, metric, progress=progress, desc=desc, **grid_kw)
    vals = grid.values.float().reshape(len(rows), len(clean)).cpu()
    tokens = grid.tokens[0] if grid.tokens else None
    return vals, metric(source.logits).float().cpu(), grid.base.float().reshape(-1).cpu(), tokens
