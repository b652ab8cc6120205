"""The one activation collector: sites captured through the engine over many inputs, in batches.

    acts = collect(lm, prompts, ["blocks.3.resid_post"], at="last")          # {site: [N, d]}
    acts = collect(lm, prompts, sites, at={"subj": Subject("Paris"), "end": -1})  # {site: [N, 2, d]}

`at` selects positions per item, after right padding, counted in that item's own tokens:
None (every position, the raw [N, T, ...] tensor), "last", "mean" (over the item's tokens; on a
channels-first grid [N, C, *S] of tensor inputs, over its spatial axes), an int (negative counts
from the item's own end), a slice or list of positions (their mean), Tokens / Subject (their
mean), a callable fn(i, tokens) -> int | list[int] (i: the item's index in `inputs`), or a dict
{name: spec} which stacks the named selections on a new axis 1. Steering, erasure, probe data
sets and DAS all collect through `collect_batch`.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapters.base import Prepared
from .engine import resolve_positions
from .errors import InterpError, PositionError, SiteShapeError
from .ops import Subject, Tokens

_WORDS = ("last", "mean", "all")


class EmptyInputsError(InterpError, ValueError):
    """The collector was given no examples."""


def is_text(x: Any) -> bool:
    """A prompt or a non-empty list / tuple of prompts."""
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and bool(x) and all(isinstance(y, str) for y in x))


def _rows(x: Any) -> int | None:
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None


def batches(inputs: Any, batch_size: int, split_keys: Sequence[str] | None = None) -> Iterator[tuple[Any, int]]:
    """Yield (batch, start). Prompts and tensors / tuples / dicts with the batch first are cut into batches
    (in a dict only `split_keys`, default every tensor with N rows); any other iterable is a dataset of
    ready batches."""
    if batch_size < 1:
        raise InterpError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(inputs, str):
        inputs = [inputs]
    if is_text(inputs):
        for i in range(0, len(inputs), batch_size):
            yield list(inputs[i:i + batch_size]), i
    elif isinstance(inputs, torch.Tensor):
        for i in range(0, inputs.shape[0], batch_size):
            yield inputs[i:i + batch_size], i
    elif isinstance(inputs, tuple) and inputs and isinstance(inputs[0], torch.Tensor):
        n = inputs[0].shape[0]
        for i in range(0, n, batch_size):
            yield tuple(t[i:i + batch_size] if _rows(t) == n else t for t in inputs), i
    elif isinstance(inputs, Mapping):
        n = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        cut = (lambda k, v: k in split_keys) if split_keys is not None else (lambda k, v: _rows(v) == n)
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] if cut(k, v) else v for k, v in inputs.items()}, i
    else:
        start = 0
        for item in inputs:
            yield item, start
            start += len(item) if is_text(item) else (_rows(item) or 0)


def _check(spec: Any) -> None:
    ok = spec is None or spec in _WORDS or isinstance(spec, (int, slice, list, tuple, range, Tokens, Subject)) \
        or callable(spec)
    if isinstance(spec, str) and spec not in _WORDS:
        ok = False
    if not ok or isinstance(spec, bool):
        raise PositionError(f"cannot select positions with {spec!r}: use None, 'last', 'mean', an int, a slice, "
                            "a list of ints, Tokens, Subject, fn(i, tokens) or a dict of these")


def _positions(spec: Any, tokens: list[str] | None, length: int, i: int) -> list[int]:
    if spec == "last":
        return [length - 1]
    if spec == "mean":
        return list(range(length))
    if callable(spec) and not isinstance(spec, (Tokens, Subject)):
        got = spec(i, tokens)
        return [int(got)] if isinstance(got, int) else [int(p) for p in got]
    pos = resolve_positions(spec, tokens, length)
    if not pos:
        raise PositionError(f"position spec {spec!r} selects no position of item {i} ({length} tokens)")
    return pos


def _select(x: torch.Tensor, spec: Any, lengths: list[int], tokens: list | None, start: int,
            text: bool) -> torch.Tensor:
    """x [b, T, ...] -> [b, ...]: per item the mean of the positions `spec` selects."""
    if spec == "mean" and not text and x.dim() >= 4:  # channels-first grid: the spatial mean
        return x.flatten(2).mean(-1)
    if x.dim() < 3 and spec in ("last", "mean"):       # already one vector per item
        return x
    if x.dim() < 3:
        raise SiteShapeError(f"positions {spec!r} need a sequence site [batch, pos, ...]; the activations have "
                             f"shape {tuple(x.shape)}")
    rows = []
    for j in range(x.shape[0]):
        toks = tokens[j][:lengths[j]] if tokens else None
        idx = _positions(spec, toks, lengths[j], start + j)
        rows.append(x[j, idx[0]] if len(idx) == 1 else x[j, idx].mean(0))
    return torch.stack(rows)


def _prepare(lm: Any, batch: Any) -> tuple[Any, bool, list[int] | None, list | None]:
    """(model inputs, is_text, per-item lengths or None, per-item token strings or None)."""
    if isinstance(batch, Prepared):
        prepared, text = batch, bool(batch.tokens)
    elif is_text(batch):
        prepared, text = lm.adapter.prepare([batch] if isinstance(batch, str) else list(batch), pad=True), True
    else:
        return batch, False, None, None
    mask = prepared.kwargs.get("attention_mask")
    if mask is not None and bool((mask[:, :-1] < mask[:, 1:]).any()):
        raise InterpError("the tokenizer padded on the left; the collector needs right padding "
                          "(tokenizer.padding_side = 'right')")
    lengths: list = mask.sum(1).tolist() if mask is not None else [prepared.seq_len] * prepared.batch
    return prepared, text, [int(n) for n in lengths], prepared.tokens or None


def collect_batch(lm: Any, batch: Any, sites: Sequence[str], at: Any = None, *, start: int = 0,
                  dtype: torch.dtype | None = torch.float32, device: Any = "cpu", flatten: bool = False,
                  once: bool = False, shapes: dict | None = None, **run_kw) -> dict[str, torch.Tensor]:
    """One engine run of `batch` capturing `sites`, positions selected per item by `at` (see the module).

    dtype / device None keep the model's; flatten=True flattens the feature axes after selection;
    once=True refuses a site that runs more than once per forward; `shapes`, if given, receives each
    site's raw captured shape."""
    specs = at if isinstance(at, Mapping) else None
    for s in (specs.values() if specs is not None else [at]):
        _check(s)
    model_in, text, lengths, tokens = _prepare(lm, batch)
    with torch.no_grad():
        cache = lm.run(model_in, capture=list(sites), **run_kw).cache
    out = {}
    for site in sites:
        if once and cache.axes.get(site, ("batch",))[0] == "call":
            raise SiteShapeError(f"site {site!r} ran more than once per forward pass; capture a site that runs once")
        x = cache[site]
        if shapes is not None:
            shapes[site] = tuple(x.shape)
        x = x.to(dtype=dtype or x.dtype)  # select in the output dtype (float32 / float64 means)
        lens = lengths or [x.shape[1] if x.dim() > 1 else 1] * x.shape[0]
        if specs is not None:
            if x.dim() < 3:
                raise SiteShapeError(f"site {site!r} carries shape {tuple(x.shape)}, not [batch, pos, features]: "
                                     "named positions need a sequence site")
            x = torch.stack([_select(x, s, lens, tokens, start, text) for s in specs.values()], 1)
        elif at not in (None, "all"):
            x = _select(x, at, lens, tokens, start, text)
        if flatten:
            x = x.flatten(2 if specs is not None else 1)
        out[site] = x.to(device=device if device is not None else x.device)
    return out


def collect(lm: Any, inputs: Any, sites: str | Sequence[str], at: Any = None, *, batch_size: int = 16,
            dtype: torch.dtype | None = torch.float32, device: Any = "cpu", flatten: bool = False,
            once: bool = False, split_keys: Sequence[str] | None = None, progress: bool = False,
            desc: str = "collect", shapes: dict | None = None, **run_kw) -> dict[str, torch.Tensor]:
    """Activations of `sites` over `inputs` (prompts, a tensor / tuple / dict with the batch first, or an
    iterable of ready batches), run in batches of `batch_size`: {site: [N, ...]} (see the module for `at`)."""
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise InterpError("collect() needs sites to capture, e.g. 'blocks.3.resid_post'")
    for s in names:
        lm.site(s)  # unknown sites fail here, with suggestions
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in names}
    with torch.no_grad():
        for batch, start in tqdm(list(batches(inputs, batch_size, split_keys)), desc=desc, disable=not progress,
                                 leave=False):
            got = collect_batch(lm, batch, names, at, start=start, dtype=dtype, device=device, flatten=flatten,
                                once=once, shapes=shapes, **run_kw)
            for s in names:
                parts[s].append(got[s])
    if not parts[names[0]]:
        raise EmptyInputsError(f"no examples in the inputs for {names}: pass at least one prompt or row")
    return {s: torch.cat(v) for s, v in parts.items()}


def by_length(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches in `order` whose items share one length (for runs that must not pad)."""
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(int(lengths[i]), []).append(int(i))
    for members in groups.values():
        for s in range(0, len(members), batch_size):
            yield members[s:s + batch_size]


__all__ = ["EmptyInputsError", "collect", "collect_batch", "batches", "by_length", "is_text"]
