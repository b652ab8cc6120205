"""The CounterFact-style study on a real model: known facts, shared value targets, ROME / MEMIT / AlphaEdit at
batch sizes 1, 10 and all, scored on efficacy, generalisation, specificity and fluency; JSON + curve figure."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from interp.io import load_state, save_state

from .evaluate import Case, edited, fluency, known_facts, make_cases, score
from .layers import down_proj
from .solver import SolverConfig, Targets, ValueConfig, compute_targets, edit, prefixes
from .stats import key_stats

METRICS = ("efficacy", "generalisation", "specificity")


@dataclass
class StudyConfig:
    layers: list = field(default_factory=lambda: [2, 3, 4, 5, 6])   # MEMIT / AlphaEdit range; ROME: the last
    max_facts: int = 100
    singles: int = 10
    batch_sizes: list = field(default_factory=lambda: [0, 10, 1])    # 0: every fact in one batch
    n_prefixes: int = 2
    n_tokens: int = 20_000
    text: str = "licenses"
    fluency_prompts: int = 5
    fluency_tokens: int = 30
    value_steps: int = 20
    seed: int = 0
    methods: dict = field(default_factory=lambda: {"rome": {}, "memit": {}, "alphaedit": {},
                                                   "alphaedit-energy1%": {"null_energy": 0.01}})


_STUDY_DEFAULTS = StudyConfig()


def _subset(t: Targets, idx: Sequence[int]) -> Targets:
    return Targets(t.layer, [t.facts[i] for i in idx], t.deltas[list(idx)], t.z[list(idx)], [t.info[i] for i in idx])


def summarize(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for m in METRICS:
        vals = [r[m] for r in rows if not math.isnan(r[m])]
        mean = sum(vals) / len(vals) if vals else float("nan")
        se = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1) / max(len(vals), 1)) ** 0.5 if vals else 0.0
        out[m], out[m + "_se"] = mean, se
    out["p_new"] = sum(r["p_new"] for r in rows) / len(rows)
    out["neighbour_p_true"] = sum(r["neighbour_p_true"] for r in rows if not math.isnan(r["neighbour_p_true"])) / \
        max(1, sum(not math.isnan(r["neighbour_p_true"]) for r in rows))
    return out


def _run_batches(lm, cases: list[Case], idx: list[int], size: int, method: str, layers: list[int], targets: Targets,
                 stats, context, cfg: SolverConfig, flu_prompts: list[str] | None, flu_tokens: int = 30) -> dict:
    rows, seconds, flu = [], [], None
    for s in range(0, len(idx), size):
        part = idx[s:s + size]
        t0 = time.perf_counter()
        e = edit(lm, [cases[i].fact for i in part], "rome" if method == "rome" else "alphaedit"
                 if method.startswith("alphaedit") else "memit", layers, targets=_subset(targets, part),
                 stats=stats, context=context, solver_cfg=cfg, progress=False)
        seconds.append(time.perf_counter() - t0)
        with edited(lm.model, e):
            rows += score(lm, [cases[i] for i in part])
            if flu_prompts is not None and s == 0:
                flu = fluency(lm, flu_prompts, n_tokens=flu_tokens)
    return {"summary": summarize(rows), "rows": rows, "solve_seconds": seconds, "fluency": flu}


def run_study(lm, out: str | Path, cfg: StudyConfig = _STUDY_DEFAULTS, progress: bool = True) -> dict:
    """Run the whole study and write `out/editing_study.json` (targets are cached in `out/targets.safetensors`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    known = known_facts(lm)
    cases, reserve = make_cases(lm, known, cfg.max_facts, seed=cfg.seed)
    L = cfg.layers[-1]
    stats = key_stats(lm, [down_proj(lm, l) for l in cfg.layers], cfg.text, cfg.n_tokens, seed=cfg.seed)
    context = prefixes(lm, n=cfg.n_prefixes, seed=cfg.seed)
    tfile = out / "targets.safetensors"  # safetensors + JSON: nothing is unpickled
    facts = [c.fact for c in cases]
    texts = [f.text() + f.target for f in facts]
    d = load_state(tfile) if tfile.exists() else None
    if d is not None and d["texts"] == texts:
        targets = Targets(L, facts, d["deltas"], d["z"], d["info"])
    else:
        targets = compute_targets(lm, facts, L, context, ValueConfig(steps=cfg.value_steps), progress)
        save_state(tfile, {"texts": texts, "deltas": targets.deltas, "z": targets.z, "info": targets.info})
    t_values = time.perf_counter() - t0
    flu_prompts = [c.fact.text() for c in cases[:cfg.fluency_prompts]]
    base_rows = score(lm, cases)
    report = {"config": asdict(cfg), "n_candidates_known": len(known), "n_edited": len(cases),
              "n_reserved_neighbours": len(reserve), "context_templates": context,
              "key_statistics": {str(l): s.record for l, s in stats.items()},
              "unedited": {"summary": summarize(base_rows),
                           "fluency": fluency(lm, flu_prompts, n_tokens=cfg.fluency_tokens)},
              "seconds_to_targets": t_values, "runs": {}}
    for size in cfg.batch_sizes:  # the largest batch of every method first
        for name, over in cfg.methods.items():
            layers = [L] if name == "rome" else list(cfg.layers)
            scfg = replace(SolverConfig(), **over)
            idx = list(range(cfg.singles)) if size == 1 else list(range(len(cases)))
            n = size or len(cases)
            run = _run_batches(lm, cases, idx, n, name, layers, targets, stats, context, scfg,
                               flu_prompts if n == len(cases) else None, cfg.fluency_tokens)
            report["runs"][f"{name}/{n}"] = {"method": name, "batch_size": n, "layers": layers,
                                             "solver": asdict(scfg), **run}
            if progress:
                print(f"{name} batch {n}: {run['summary']}", flush=True)
            (out / "editing_study.json").write_text(json.dumps(report, indent=1, default=str))
    report["seconds_total"] = time.perf_counter() - t0
    (out / "editing_study.json").write_text(json.dumps(report, indent=1, default=str))
    return report
