"""Datasets of prompt pairs with per-item answers, per-item metrics, and bootstrap confidence intervals.

    pairs = load_pairs("pairs.jsonl")            # {"clean": ..., "corrupted": ..., "target": " Paris", "foil": " Rome"}
    pairs = load_pairs([("The Eiffel Tower is in", "The Colosseum is in", " Paris", " Rome"), ...])
    pairs = from_template("The {x} is located in the city of", [("Eiffel Tower", " Paris"), ...], ...)

A pair is one clean / corrupted prompt with its own answer (`target`) and optionally a `foil`. A metric for many
pairs gets each item's answer ids: `metric(logits, answers)` with `answers` a dict of LongTensors
(`target`, `foil`) aligned with the rows of `logits` (`per_item` builds that from a batch of items, including
run_grid's packing of rows x items into one batch).
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError


class PairsError(InterpError, ValueError):
    """A prompt-pair dataset that cannot be used as given."""


@dataclass(frozen=True)
class Pair:
    clean: str
    corrupted: str
    target: str | int | None = None
    foil: str | int | None = None
    meta: dict = field(default_factory=dict, compare=False)


FIELDS = ("clean", "corrupted", "target", "foil")


def _pair(item: Any, where: str) -> Pair:
    if isinstance(item, Pair):
        return item
    if isinstance(item, dict):
        missing = [k for k in ("clean", "corrupted") if not item.get(k)]
        if missing:
            raise PairsError(f"{where}: missing {missing}; each pair needs 'clean' and 'corrupted' prompts "
                             "(and usually 'target', optionally 'foil')")
        meta = {k: v for k, v in item.items() if k not in FIELDS}
        return Pair(item["clean"], item["corrupted"], item.get("target") or None, item.get("foil") or None, meta)
    if isinstance(item, (tuple, list)) and 2 <= len(item) <= 4 and all(isinstance(x, (str, int)) for x in item):
        return Pair(*item)
    raise PairsError(f"{where}: a pair is a dict with clean/corrupted/target/foil, a Pair, or a tuple "
                     f"(clean, corrupted[, target[, foil]]), not {type(item).__name__}")


def load_pairs(spec: str | Path | Iterable) -> list[Pair]:
    """A list of pairs (dicts, tuples or Pair), or a .csv / .jsonl file with clean, corrupted, target, foil."""
    if isinstance(spec, (str, Path)) and Path(spec).suffix in (".csv", ".jsonl", ".json"):
        path = Path(spec)
        if not path.exists():
            raise PairsError(f"no pairs file {str(path)!r}")
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                items = list(csv.DictReader(fh))
        else:
            items = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise PairsError(f"{path}:{n}: not JSON ({e.msg})") from None
        out = [_pair(it, f"{path} item {i}") for i, it in enumerate(items)]
    elif isinstance(spec, str):
        raise PairsError(f"pairs {spec!r}: give a list of pairs or a .csv / .jsonl file")
    else:
        out = [_pair(it, f"pair {i}") for i, it in enumerate(spec)]
    if not out:
        raise PairsError("the pair dataset is empty")
    return out


def from_template(template: str, fills: Sequence[tuple[str, Any]], *, key: str = "x",
                  corrupt: Callable[[int], int] | None = None) -> list[Pair]:
    """Pairs from a template: fills are (filler, answer); item i's corrupted prompt uses the filler of item
    corrupt(i) (default: the next one, cyclically), and its foil is that item's answer."""
    if len(fills) < 2:
        raise PairsError("from_template needs at least two (filler, answer) fills")
    if "{" + key + "}" not in template:
        raise PairsError(f"template {template!r} has no {{{key}}} slot")
    corrupt = corrupt or (lambda i: (i + 1) % len(fills))
    out = []
    for i, (filler, answer) in enumerate(fills):
        j = corrupt(i)
        out.append(Pair(template.format(**{key: filler}), template.format(**{key: fills[j][0]}), answer, fills[j][1],
                        {"filler": filler, "corrupted_filler": fills[j][0]}))
    return out


def answer_ids(tokenizer, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
    """{'target': [n], 'foil': [n]} token ids (each answer one token; ints are taken as ids)."""
    from interp.metrics import token_id

    out = {}
    for name in ("target", "foil"):
        vals = [getattr(p, name) for p in pairs]
        if all(v is None for v in vals):
            continue
        if any(v is None for v in vals):
            raise PairsError(f"some pairs have a {name} and some do not; give every pair one")
        out[name] = torch.tensor([v if isinstance(v, int) else token_id(tokenizer, v) for v in vals])
    return out


def per_item(metric: Callable[[torch.Tensor, dict], torch.Tensor], answers: dict[str, torch.Tensor]):
    """A logits -> [N] metric for run_grid from a per-item metric(logits, answers): run_grid packs
    rows x items row-major (row 0's items, then row 1's, ...), so the answers are tiled to the batch."""
    b = len(next(iter(answers.values())))

    def fn(logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        if n % b:
            raise PairsError(f"a batch of {n} rows is not a multiple of the {b} items")
        tiled = {k: v.to(logits.device).repeat(n // b) for k, v in answers.items()}
        out = metric(logits, tiled)
        if out.shape[:1] != (n,):
            raise PairsError(f"the per-item metric returned shape {tuple(out.shape)}; it must give one value per "
                             f"row of logits ({n})")
        return out
    return fn


def logit_diff_items(logits: torch.Tensor, answers: dict) -> torch.Tensor:
    """Per item: logit(target) - logit(foil) at the last position."""
    last = (logits[:, -1] if logits.dim() == 3 else logits).float()
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, answers["target"]] - last[rows, answers["foil"]]


def prob_items(logits: torch.Tensor, answers: dict) -> torch.Tensor:
    """Per item: p(target) at the last position."""
    last = (logits[:, -1] if logits.dim() == 3 else logits).float().softmax(-1)
    return last[torch.arange(last.shape[0], device=last.device), answers["target"]]


ITEM_METRICS = {"logit_diff": logit_diff_items, "prob": prob_items}


def bootstrap_ci(values: torch.Tensor, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over axis 0 and its percentile-bootstrap interval (resampling items with replacement, seeded).
    With a single item the interval is the point itself."""
    v = values.double()
    mean = v.mean(0)
    if v.shape[0] < 2:
        return mean, mean.clone(), mean.clone()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.shape[0], (n_boot, v.shape[0]), generator=g)
    means = v[idx].mean(1)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, a, dim=0), torch.quantile(means, 1 - a, dim=0)
    return mean, lo, hi
