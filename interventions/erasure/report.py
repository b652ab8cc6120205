"""Efficacy and specificity of an erasure on the shapes zoo models, measured with interp.zoo.scorers.

Efficacy: how often images of the concept's prompts still show the concept (e.g. the red-hue rate of
"red ..." prompts), before and after. Specificity: every attribute's accuracy on the other prompts (other
colours' accuracy, shape accuracy, ...), before and after. Written as JSON plus a PNG image grid.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interp.io import atomic_write_text

from .core import Concept


def shapes_attribute(word: str) -> str:
    from interp.zoo import shapes

    for attr, values in shapes.ATTRIBUTES.items():
        if word in values:
            return attr
    raise ValueError(f"{word!r} is not a value of any shapes attribute ({shapes.ATTRIBUTES})")


def shapes_concept(word: str, guide_words: Sequence[str] | None = None) -> Concept:
    """A Concept over every shapes caption: sources name `word`; guides: its siblings (e.g. the other colours)."""
    from interp.zoo import shapes

    attr = shapes_attribute(word)
    guides = list(guide_words) if guide_words else [v for v in shapes.ATTRIBUTES[attr] if v != word]
    return Concept.from_prompts(word, [a.caption() for a in shapes.all_attributes()], guides)


def eval_attributes(per_value: int = 8, seed: int = 0) -> list:
    """`per_value` captions for every colour (a fixed, seeded draw over shape / position / size / texture)."""
    from interp.zoo import shapes

    rng = np.random.default_rng(seed)
    out = []
    for colour in shapes.COLOURS:
        pool = [a for a in shapes.all_attributes() if a.colour == colour]
        idx = rng.choice(len(pool), size=min(per_value, len(pool)), replace=False)
        out += [pool[i] for i in sorted(idx)]
    return out


def generate(pipe, prompts: Sequence[str], n_per_prompt: int, seed: int, steps: int | None,
             batch: int = 48) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1], n_per_prompt per prompt, deterministic in `seed`."""
    pipe.set_progress_bar_config(disable=True)
    flat = [p for p in prompts for _ in range(n_per_prompt)]
    kw = {} if steps is None else {"num_inference_steps": steps}
    out = []
    for i in range(0, len(flat), batch):
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            out.append(pipe(flat[i:i + batch], generator=g, output_type="np", **kw).images)
    return np.concatenate(out)


def score_images(images: np.ndarray, attrs: Sequence, n_per_prompt: int) -> dict[str, Any]:
    from interp.zoo import scorers

    targets = [a.as_dict() for a in attrs for _ in range(n_per_prompt)]
    preds = scorers.score(images)
    return {"targets": targets, "preds": preds}


def summarize(scored: dict, word: str) -> dict[str, Any]:
    attr = shapes_attribute(word)
    t, p = scored["targets"], scored["preds"]
    on = [i for i, x in enumerate(t) if x[attr] == word]
    off = [i for i, x in enumerate(t) if x[attr] != word]
    acc = lambda idx, key: float(np.mean([p[i][key] == t[i][key] for i in idx])) if idx else float("nan")
    values = sorted({x[attr] for x in t})
    return {
        "concept_rate": float(np.mean([p[i][attr] == word for i in on])),  # e.g. red-hue rate of "red ..." prompts
        "concept_rate_on_others": float(np.mean([p[i][attr] == word for i in off])),
        "other_values_accuracy": acc(off, attr),  # e.g. other colours' colour accuracy
        "per_value_accuracy": {v: acc([i for i in range(len(t)) if t[i][attr] == v], attr) for v in values},
        "accuracy_all": {k: acc(range(len(t)), k) for k in t[0]},
        "accuracy_other_prompts": {k: acc(off, k) for k in t[0]},
        "accuracy_concept_prompts": {k: acc(on, k) for k in t[0]},
        "predicted_on_concept_prompts": {v: int(sum(p[i][attr] == v for i in on)) for v in
                                         sorted({p[i][attr] for i in on})},
    }


def compare(before: dict, after: dict, word: str, min_drop: float = 0.8, max_change: float = 0.05) -> dict[str, Any]:
    """Acceptance: the concept rate drops by >= min_drop (relative); the other values' accuracy and every
    other attribute's accuracy stay within max_change of the original."""
    attr = shapes_attribute(word)
    b, a = before["concept_rate"], after["concept_rate"]
    drop = (b - a) / b if b > 0 else float("nan")
    other_attr_changes = {k: after["accuracy_all"][k] - before["accuracy_all"][k]
                          for k in before["accuracy_all"] if k != attr}
    sibling = after["other_values_accuracy"] - before["other_values_accuracy"]
    key_other = "colour" if attr == "shape" else "shape"
    return {"concept_rate_before": b, "concept_rate_after": a, "relative_drop": drop,
            "other_values_accuracy_change": sibling, "other_attribute_accuracy_change": other_attr_changes,
            "efficacy_ok": bool(drop >= min_drop),
            "specificity_ok": bool(abs(sibling) <= max_change and abs(other_attr_changes[key_other]) <= max_change),
            "criteria": f"relative drop >= {min_drop:.0%}; other {attr} values' accuracy and "
                        f"{key_other} accuracy (all prompts) within {max_change * 100:.0f} points"}


def grid(images_by_row: dict[str, np.ndarray], path: str | Path, labels_per_col: Sequence[str], title: str) -> Path:
    """One PNG: a row of images per model (original, each method) across the same prompts and seeds."""
    from interp import image_grid

    rows = list(images_by_row)
    imgs = np.concatenate([images_by_row[r] for r in rows])
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    ncol = len(labels_per_col)
    labels = [f"{r}: {c}" if j == 0 else c for r in rows for j, c in enumerate(labels_per_col)]
    return image_grid(t, path, labels=labels, ncol=ncol, title=title)


def write_report(report: dict, folder: str | Path, name: str = "erasure_report.json") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    atomic_write_text(path, json.dumps(report, indent=1, default=str))
    return path


# ---------------------------------------------------------------------------------------------
# representation-level efficacy / specificity (independent of the denoiser's image quality)
# ---------------------------------------------------------------------------------------------

def _logreg(x: torch.Tensor, y: torch.Tensor, k: int, l2: float = 1e-3, steps: int = 200):
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    lin = torch.nn.Linear(x.shape[1], k).double()
    a = (x - mu) / sd
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(a), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: lin((z - mu) / sd).argmax(-1)


def cross_attention_values(pipe, prompts: Sequence[str], start: int) -> torch.Tensor:
    """Per prompt and cross-attention layer: to_out(to_v(x)) averaged over positions >= start (what an attention
    row that spreads its weight over those tokens would add to the image stream), layers concatenated."""
    from .methods import cross_attention_layers, unet_cross_inputs

    layers = cross_attention_layers(pipe.unet)
    x = unet_cross_inputs(pipe, prompts, layers, ("to_v",))
    feats = []
    for l in layers:
        v = x[f"{l}.to_v"][:, start:] @ pipe.unet.get_submodule(f"{l}.to_v").weight.detach().double().T
        out = pipe.unet.get_submodule(f"{l}.to_out.0")
        feats.append((v @ out.weight.detach().double().T + out.bias.detach().double()).mean(1))
    return torch.cat(feats, -1)


class ValueProbe:
    """A colour (attribute) classifier trained on the original model's cross-attention value contributions,
    then used as a scorer on edited models: concept rate on the concept's prompts, accuracy on the other
    prompts. It reads what the denoiser receives from the text, so it does not depend on image quality."""

    def __init__(self, original, word: str, seed: int = 0):
        from interp.zoo import shapes

        self.word, self.attr = word, shapes_attribute(word)
        self.values = list(shapes.ATTRIBUTES[self.attr])
        attrs = shapes.all_attributes()
        self.prompts = [a.caption() for a in attrs]
        self.y = torch.tensor([self.values.index(getattr(a, self.attr)) for a in attrs])
        tok = original.tokenizer
        ids = tok(self.prompts[0])["input_ids"]
        self.start = next(i for i, t in enumerate(ids) if tok.decode([t]).strip() == getattr(attrs[0], self.attr))
        x0 = cross_attention_values(original, self.prompts, self.start)
        perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(seed))
        tr, te = perm[: len(perm) // 2], perm[len(perm) // 2:]
        held_out_pred = _logreg(x0[tr], self.y[tr], len(self.values))(x0[te])
        self.held_out_accuracy = float((held_out_pred == self.y[te]).double().mean())
        self.clf = _logreg(x0, self.y, len(self.values))
        self.original = self._scores(x0)

    def _scores(self, x: torch.Tensor) -> dict[str, Any]:
        k = self.values.index(self.word)
        on, off = self.y == k, self.y != k
        with torch.no_grad():
            pred = self.clf(x)
        return {"concept_rate": float((pred[on] == k).double().mean()),
                "other_values_accuracy": float((pred[off] == self.y[off]).double().mean()),
                "predicted_on_concept_prompts": {self.values[i]: int((pred[on] == i).sum())
                                                 for i in range(len(self.values)) if int((pred[on] == i).sum())}}

    def score(self, pipe) -> dict[str, Any]:
        return self._scores(cross_attention_values(pipe, self.prompts, self.start))


def value_probe_report(original, edited_by_method: dict, word: str, seed: int = 0) -> dict[str, Any]:
    """ValueProbe scores of the original and of each edited pipeline."""
    vp = ValueProbe(original, word, seed)
    return {"probe_held_out_accuracy_original": vp.held_out_accuracy, "original": vp.original,
            "methods": {m: vp.score(p) for m, p in edited_by_method.items()}}


def to_result(report: dict):
    """The report's numbers as an interp.Result with axes (model, metric): 'original' and each method; metrics
    are the image-level concept rate / other values' accuracy / every attribute's accuracy and the value
    probe's concept rate / other values' accuracy (NaN where not measured)."""
    from interp import Result

    rows = ["original", *report["methods"]]
    metrics = ["image_concept_rate", "image_other_values_accuracy", "image_shape_accuracy", "image_colour_accuracy",
               "probe_concept_rate", "probe_other_values_accuracy"]
    nan = float("nan")

    def row(img: dict | None, vp: dict | None) -> list[float]:
        img, vp = img or {}, vp or {}
        acc = img.get("accuracy_all", {})
        return [img.get("concept_rate", nan), img.get("other_values_accuracy", nan), acc.get("shape", nan),
                acc.get("colour", nan), vp.get("concept_rate", nan), vp.get("other_values_accuracy", nan)]

    vals = [row(report.get("original"), report.get("value_probe", {}).get("original"))]
    vals += [row(e.get("after"), e.get("value_probe")) for e in report["methods"].values()]
    return Result(torch.tensor(vals, dtype=torch.float64), ("model", "metric"), {"model": rows, "metric": metrics},
                  {"concept": report["concept"]["concept"], "metric": "rate / accuracy"})
