"""A dictionary at a site, as an engine op; its features as addressable sites.

    op = splice(sae, "blocks.6.resid_post")                     # x <- x_hat (error=False) or x (error=True)
    feats = Features({"blocks.6.resid_post.sae": sae})
    ops = feats.ops({"blocks.6.resid_post.sae.f[123]": 0.0,      # clamp feature 123 to 0 (ablation)
                     "blocks.6.resid_post.sae.f[45]": ("add", 8.0)})
    lm.run(prompt, ops=ops); lm.run_grid(...); with lm.applied(ops): model.generate(...)

Every op is one `interp.Replace` per site, so it works wherever ops work (run, run_grid rows, sessions, any
adapter). With the error term the edit is written as a difference,
    x <- x + (f' - f) @ W_dec / s_out,
so an edit-free splice returns x itself (bit for bit) and an edit moves x exactly along the decoder
directions of the edited features; without it the site becomes the reconstruction decode(f') (+ skip path).
A feature address is `<site>.<name>.f[<i>]`, `f[i,j,...]` or `f[a:b]`, with `<name>` the key it is given under.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import interp
from interp.errors import PositionError, UnknownSiteError
from interp.ops import ALL, Replace, Where

from .sae import Dictionary, DictionaryError

FEATURE_RE = re.compile(r"^(?P<site>.+)\.(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.f\[(?P<idx>[^\]]+)\]$")
EDIT_KINDS = ("set", "add", "scale", "patch")


def parse_indices(text: str, d_sae: int) -> list[int]:
    """'123', '1,5,9' or '10:20' -> feature indices (range-checked)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if ":" in part:
            a, b = part.split(":", 1)
            out += list(range(int(a or 0), int(b or d_sae)))
        else:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < d_sae]
    if bad:
        raise PositionError(f"feature indices {bad[:5]} are out of range: the dictionary has {d_sae} features "
                            f"(0..{d_sae - 1})")
    return out


@dataclass(frozen=True, eq=False)
class Edit:
    """f[features] <- value ("set"), += value ("add"), *= value ("scale"), or <- value[..., features] ("patch":
    feature activations recorded on another input with the same `where`)."""

    features: Sequence[int]
    kind: str = "set"
    value: Any = 0.0

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"feature edit kind must be one of {EDIT_KINDS}, not {self.kind!r}")

    def apply(self, f: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(list(self.features), dtype=torch.long, device=f.device)
        cur = f.index_select(-1, idx)
        if self.kind == "patch":
            src = torch.as_tensor(self.value).to(f.device, f.dtype)
            src = src.index_select(-1, idx) if src.shape[-1] != idx.numel() else src
            if src.dim() < f.dim():
                src = src.expand(*f.shape[:-1], idx.numel())
            if src.shape[-2:] != cur.shape[-2:]:
                raise DictionaryError(f"patched feature values have shape {tuple(src.shape)}, the selection is "
                                      f"{tuple(cur.shape)}: record them with the same where= on an input of "
                                      "equal length")
            new = src.expand_as(cur) if src.shape[0] == 1 else src
        else:
            v = torch.as_tensor(self.value, dtype=f.dtype, device=f.device)
            new = {"set": lambda: v.expand_as(cur), "add": lambda: cur + v, "scale": lambda: cur * v}[self.kind]()
        return f.index_copy(-1, idx, new.to(f.dtype))


class Recorder(dict):
    """What a splice saw at each call: 'f' (features before edits) and, with grad, 'f_var' (their leaf)."""


def splice(sae: Dictionary, site: str | None = None, *, error: bool = True, edits: Sequence[Edit] = (),
           record: Recorder | None = None, grad: bool = False, where: Where = ALL) -> Replace:
    """The op that runs `sae` at `site` (default: the site it was trained at), applying `edits` to its features.
    record= collects the features of every call; grad=True makes them a leaf whose .grad the caller reads
    after backward (attribution patching); the forward value is unchanged by grad."""
    site = site or sae.cfg.site
    if site is None:
        raise DictionaryError("this dictionary has no site recorded: pass the site to splice at")
    if sae.cfg.transcoder:
        raise DictionaryError("a transcoder reads one site and writes another: splice it with splice_transcoder()")
    edits = list(edits)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(sae.W_enc.dtype)
        with torch.set_grad_enabled(grad or torch.is_grad_enabled()):
            f = sae.encode(x32)
            base = f
            if grad:
                base = f.detach().clone().requires_grad_(True)
                base.retain_grad()
            f2 = base
            for e in edits:
                f2 = e.apply(f2)
            if record is not None:
                record.setdefault("f", []).append(f.detach())
                if grad:
                    record.setdefault("f_var", []).append(base)
            if error:
                delta = (f2 - f.detach()) @ sae.W_dec / sae.out_scale
                out = x32 + delta
            else:
                out = sae.reconstruct(x32, f2)
        return out.to(x.dtype)

    return Replace(site, fn=fn, where=where)


def splice_transcoder(tc: Dictionary, in_site: str | None = None, out_site: str | None = None, *,
                      error: bool = True, edits: Sequence[Edit] = (), record: Recorder | None = None,
                      where: Where = ALL) -> list[Replace]:
    """Two ops: one reads the transcoder's input at `in_site` and encodes it, the other replaces the activation
    at `out_site` with the transcoder output (error=False) or adds the edit difference (error=True)."""
    in_site, out_site = in_site or tc.cfg.site, out_site or tc.cfg.out_site
    if not (in_site and out_site):
        raise DictionaryError("a transcoder splice needs both sites: pass in_site= and out_site=")
    state: dict[str, torch.Tensor] = {}

    def read(x: torch.Tensor) -> torch.Tensor:
        xin = x.to(tc.W_enc.dtype)
        state["x"], state["f"] = xin, tc.encode(xin)
        return x

    def write(y: torch.Tensor) -> torch.Tensor:
        if "f" not in state:
            raise DictionaryError(f"the transcoder's input site {in_site!r} did not run before {out_site!r}")
        f = state.pop("f")
        f2 = f
        for e in edits:
            f2 = e.apply(f2)
        if record is not None:
            record.setdefault("f", []).append(f.detach())
        y32 = y.to(tc.W_dec.dtype)
        out = y32 + (f2 - f) @ tc.W_dec / tc.out_scale if error else tc.reconstruct(state["x"], f2)
        return out.to(y.dtype)

    return [Replace(in_site, fn=read, where=where), Replace(out_site, fn=write, where=where)]


class Features:
    """Named dictionaries at sites; feature addresses '<site>.<name>.f[i]' become ops."""

    def __init__(self, dictionaries: Mapping[str, Dictionary], error: bool = True):
        self.dicts: dict[str, tuple[str, Dictionary]] = {}
        for key, sae in dictionaries.items():
            site, _, name = key.rpartition(".")
            if not site or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise DictionaryError(f"dictionary key {key!r} must be '<site>.<name>', e.g. 'blocks.6.resid_post.sae'")
            self.dicts[key] = (site, sae)
        self.error = error

    def parse(self, address: str) -> tuple[str, Dictionary, list[int]]:
        m = FEATURE_RE.match(address)
        if not m:
            raise UnknownSiteError(f"{address!r} is not a feature address; write '<site>.<name>.f[<i>]', "
                                   f"e.g. '{next(iter(self.dicts), 'blocks.6.resid_post.sae')}.f[123]'")
        key = f"{m['site']}.{m['name']}"
        if key not in self.dicts:
            raise UnknownSiteError(f"no dictionary {key!r} is registered; registered: {sorted(self.dicts)}")
        site, sae = self.dicts[key]
        return site, sae, parse_indices(m["idx"], sae.d_sae)

    def ops(self, edits: Mapping[str, Any], where: Where = ALL,
            record: Mapping[str, Recorder] | None = None) -> list[Replace]:
        """{address: value} -> one splice op per dictionary. A value is a number (set), or (kind, value) with
        kind in set / add / scale / patch."""
        by_key: dict[str, list[Edit]] = {}
        for address, value in edits.items():
            site, sae, idx = self.parse(address)
            kind, v = value if isinstance(value, tuple) else ("set", value)
            by_key.setdefault(f"{site}|{id(sae)}", []).append(Edit(idx, kind, v))
        out = []
        for key, (site, sae) in self.dicts.items():
            es = by_key.get(f"{site}|{id(sae)}")
            if es is not None:
                out.append(splice(sae, site, error=self.error, edits=es, where=where,
                                  record=None if record is None else record.get(key)))
        return out


def feature_acts(lm, sae: Dictionary, inputs, site: str | None = None, where: Where = ALL, **run_kw) -> torch.Tensor:
    """Feature activations [batch, pos, d_sae] of `inputs` at the dictionary's site (the forward is unchanged)."""
    rec = Recorder()
    interp.attach(lm).run(inputs, ops=[splice(sae, site, error=True, record=rec, where=where)], **run_kw)
    return torch.cat(rec["f"]) if len(rec["f"]) > 1 else rec["f"][0]


def feature_attribution(lm, sae: Dictionary, clean, corrupt, metric: Callable[[torch.Tensor], torch.Tensor],
                        site: str | None = None):
    """Attribution patching in the feature basis: effect of patching each (position, feature) from the clean run
    into the corrupted run, to first order, (f_clean - f_corrupt) * d metric / d f at the corrupted run.
    Returns an interp.Result (pos, feature) summed over the batch; attrs hold both metric values."""
    lm = interp.attach(lm)
    f_clean = feature_acts(lm, sae, clean, site)
    rec = Recorder()
    out = lm.run(corrupt, ops=[splice(sae, site, error=True, record=rec, grad=True)], grad=True)
    m = metric(out.logits).sum()
    m.backward()
    f_var = rec["f_var"][0]
    attr = ((f_clean - f_var.detach()) * f_var.grad).sum(0)
    lm.model.zero_grad(set_to_none=True)
    tokens = out.str_tokens or [str(i) for i in range(attr.shape[0])]
    return interp.Result(attr, ("pos", "feature"), {"pos": [f"{i}:{t}" for i, t in enumerate(tokens)]},
                         {"metric": "attribution (first-order metric change)", "site": site or sae.cfg.site,
                          "corrupt_metric": float(m.detach())})


__all__ = ["splice", "splice_transcoder", "Edit", "Features", "Recorder", "feature_acts", "feature_attribution",
           "parse_indices", "FEATURE_RE", "dose_response"]


@torch.no_grad()
def dose_response(lm, sae: Dictionary, feature: int, prompts: Sequence[str], target_ids: Sequence[int],
                  doses: Sequence[float], site: str | None = None, kind: str = "add") -> interp.Result:
    """Feature steering: for each dose, f[feature] += dose (kind="add") or = dose ("set") at every position
    (error term kept), and the mean log-probability of `target_ids` at the last position over `prompts`.
    Returns a Result (dose,) with per-prompt values in attrs."""
    lm = interp.attach(lm)
    vals, per = [], []
    for d in doses:
        op = splice(sae, site, error=True, edits=[Edit([feature], kind, float(d))])
        row = []
        for p in prompts:
            lp = lm.run(p, ops=[op]).logits[0, -1].float().log_softmax(-1)
            row.append(float(lp[list(target_ids)].logsumexp(0)))
        per.append(row)
        vals.append(sum(row) / len(row))
    return interp.Result(torch.tensor(vals), ("dose",), {"dose": [float(d) for d in doses]},
                         {"metric": "log P(target tokens) at the last position", "feature": feature,
                          "site": site or sae.cfg.site, "per_prompt": per, "prompts": list(prompts),
                          "targets": list(target_ids), "kind": kind})
