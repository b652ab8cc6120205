"""`interp sae`: train a sparse dictionary on a language model's site and report on it.

    interp sae train --site blocks.15.resid_post --kind topk --k 32 --expansion 4 --tokens 60000 --out runs/sae
    interp sae info runs/sae/dictionary            # any layout: interp, SAELens, sparsify
    interp sae eval runs/sae/dictionary --windows 8
    interp sae steer runs/sae                      # dose-response of a feature chosen by its top contexts

`train` collects activations of offline text (the Debian `fortunes` package) into an activation store on disk
(resumable), trains the dictionary with checkpoints, then writes into --out: metrics.json (explained variance,
L0, dead fraction, CE clean / spliced / with error term / zero-ablated, CE recovered, throughput), density.png
and density Result, features.html (top contexts + logit effects of the most frequently firing and the
most token-consistent features) and steering.json / steering Result (dose-response of one feature chosen by its
top contexts, on its top promoted token).
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("sae", help="train / inspect sparse dictionaries (SAEs, transcoders) on LM sites",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="sae_command", required=True, metavar="ACTION")
    t = s.add_parser("train", help="store activations, train, evaluate, report")
    t.add_argument("--model", default="smollm2", help="zoo name or folder (default: %(default)s)")
    t.add_argument("--site", default="blocks.15.resid_post")
    t.add_argument("--kind", default="topk", choices=("relu", "topk", "batchtopk", "jumprelu"))
    t.add_argument("--k", type=int, default=32, help="features per token (topk / batchtopk)")
    t.add_argument("--expansion", type=int, default=4, help="d_sae = expansion x d_in")
    t.add_argument("--tokens", type=int, default=60000, help="training rows (tokens) to store")
    t.add_argument("--eval-windows", type=int, default=16, help="held-out 128-token windows for CE / metrics")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--l1", type=float, default=3e-2)
    t.add_argument("--l0", type=float, default=1e-2)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="interp-out/sae")
    t.set_defaults(func=run_train)
    i = s.add_parser("info", help="print a dictionary's configuration (any supported layout)")
    i.add_argument("path")
    i.set_defaults(func=run_info)
    e = s.add_parser("eval", help="explained variance, L0, dead fraction, CE recovered on held-out text")
    e.add_argument("path")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--site", help="site (default: the one recorded in the dictionary)")
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--seq-len", type=int, default=128)
    e.set_defaults(func=run_eval)
    st = s.add_parser("steer", help="feature steering dose-response on a finished `train` folder")
    st.add_argument("path")
    st.add_argument("--model", default="smollm2")
    st.add_argument("--seq-len", type=int, default=128)
    st.add_argument("--eval-windows", type=int, default=16)
    st.add_argument("--seed", type=int, default=0)
    st.set_defaults(func=run_steer)


def _windows(lm, seq_len: int, seed: int):
    import torch

    from interp.store import token_windows
    from probes.dictionaries.corpus import fortunes

    texts = fortunes(seed)
    return torch.stack(list(token_windows(lm.tokenizer, texts, seq_len, sep="\n\n"))), len(texts)


def run_info(args) -> int:
    from probes.dictionaries import load

    sae = load(args.path)
    print(json.dumps({k: v for k, v in sae.cfg.to_json().items() if k != "meta"}, indent=1))
    print(f"source: {sae.cfg.meta.get('source', 'interp')}")
    return 0


def run_eval(args) -> int:
    import torch

    import interp
    from probes.dictionaries import load
    from probes.dictionaries.metrics import ce_recovered, reconstruction
    from recipes.models import load as load_model

    torch.set_grad_enabled(False)
    lm = interp.attach(load_model(args.model))
    sae = load(args.path)
    site = args.site or sae.cfg.site
    W, _ = _windows(lm, args.seq_len, 0)
    held = W[-args.windows:]
    X = lm.capture(held, site)[site][:, 1:].reshape(-1, sae.cfg.d_in)
    rec = reconstruction(sae, X)
    ce = ce_recovered(lm, sae, held.split(4), site)
    rec.pop("frequency")
    print(json.dumps({**rec, **ce}, indent=1))
    return 0


def run_train(args) -> int:
    import torch

    import interp
    from interp.store import ActivationStore, batched
    from probes.dictionaries import DictConfig, TrainConfig, Trainer
    from recipes.models import load as load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = interp.attach(load_model(args.model))
    W, n_texts = _windows(lm, args.seq_len, args.seed)
    n_eval = args.eval_windows
    train_w, held = W[:-n_eval], W[-n_eval:]
    t0 = time.perf_counter()
    store = ActivationStore(lm, args.site, skip_first=1, directory=out / "store", shard_rows=8192)
    with torch.no_grad():
        store.fill(batched(train_w, 8), max_rows=args.tokens)
    t_store = time.perf_counter() - t0
    d_in = store.tensors(1)[args.site].shape[-1]
    cfg = DictConfig(d_in=d_in, d_sae=args.expansion * d_in, kind=args.kind,
                     k=args.k if args.kind in ("topk", "batchtopk") else None, site=args.site,
                     meta={"model": args.model, "corpus": "debian fortunes", "tokens": len(store)})
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, l1=args.l1, l0=args.l0,
                     seed=args.seed, checkpoint_dir=str(out), checkpoint_every=250, dead_after=50 * args.batch_size)
    trainer = Trainer(cfg, tc)
    sae = trainer.run(store).eval()
    torch.set_grad_enabled(False)
    metrics = _evaluate(lm, sae, args.site, held, store)
    metrics.update(corpus="Debian package 'fortunes' (/usr/share/games/fortunes)", corpus_entries=n_texts,
                   corpus_windows=int(W.shape[0]), train_tokens=len(store), store_seconds=t_store,
                   store_rows_per_s=len(store) / t_store if t_store else None,
                   train_rows_per_s=trainer.log.rows_per_s, train_rows=trainer.log.rows, steps=trainer.step,
                   threads=args.threads, config={k: v for k, v in cfg.to_json().items() if k != "meta"})
    metrics.update(_reports(lm, sae, args.site, store, train_w, out))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=1))
    return 0


def _evaluate(lm, sae, site: str, held, store) -> dict:
    from probes.dictionaries.metrics import ce_recovered, reconstruction
    from probes.dictionaries.splice import splice

    X = lm.capture(held, site)[site][:, 1:].reshape(-1, sae.cfg.d_in)
    rec = reconstruction(sae, X)
    rec.pop("frequency")
    ce = ce_recovered(lm, sae, held.split(4), site)
    ids = held[:2]
    clean = lm.run(ids).logits
    spliced = lm.run(ids, ops=[splice(sae, site, error=True)]).logits
    return {**{f"heldout_{k}": v for k, v in rec.items()}, **{f"ce_{k}": v for k, v in ce.items()},
            "error_term_max_abs_logit_diff": float((clean - spliced).abs().max())}


def _reports(lm, sae, site: str, store, windows, out: Path) -> dict:
    from probes.dictionaries.report import (
        consistent_features,
        density,
        feature_matrix,
        logit_effects,
        plot_density,
        top_contexts,
        write_html,
    )

    rows = store.tensors()
    F = feature_matrix(sae, rows[site])
    den = density(sae, F=F)
    den.save(out / "density")
    plot_density(den, out / "density.png", title=f"{site} {sae.kind} SAE, d_sae={sae.d_sae}")
    freq = den.values
    cand = [j for j in freq.argsort(descending=True).tolist() if 1e-3 < freq[j] < 0.05][:200]
    ctx = top_contexts(sae, rows, windows, lm.tokenizer, cand, k=10, F=F)
    chosen = [c for c in consistent_features(ctx) if c[1].isalpha() and len(c[1]) > 1]
    show = [c[0] for c in chosen[:12]] or cand[:12]
    eff = logit_effects(lm, sae, show, k=8)
    eff.save(out / "logit_effects")
    write_html({j: ctx[j] for j in show}, eff, out / "features.html", title=f"{site} features (top contexts)")
    result = {"consistent_features": [{"feature": j, "token": t, "share": s} for j, t, s in chosen[:20]]}
    if chosen:
        result["steering"] = _steering(lm, sae, site, chosen[0], ctx, windows, F, out)
    return result


STEER_PROMPTS = ("I think that", "The story begins when", "In the morning we", "She said that the",
                 "Nothing is more", "My friend told me")


def _steering(lm, sae, site: str, chosen, ctx, windows, F, out: Path) -> dict:
    """Dose-response of the feature chosen by its top contexts: f += dose at every position of neutral prompts;
    metric = log P(the token that most often follows the feature's top contexts) at the last position."""
    from collections import Counter

    from probes.dictionaries.splice import dose_response

    j, tok, share = chosen
    nxt = Counter(int(windows[c.item, c.pos + 1]) for c in ctx[j] if c.pos + 1 < windows.shape[1])
    target = nxt.most_common(1)[0][0]
    act = float(F[:, j].max())
    doses = [0.0, 0.25 * act, 0.5 * act, 1.0 * act, 2.0 * act, 4.0 * act]
    dr = dose_response(lm, sae, j, list(STEER_PROMPTS), [target], doses, site)
    dr.save(out / "steering")
    vals = dr.values.tolist()
    return {"feature": j, "context_token": tok, "context_share": share, "target_token": lm.tokenizer.decode([target]),
            "target_follows_contexts": f"{nxt[target]}/{sum(nxt.values())}", "max_activation": act, "doses": doses,
            "logp": vals, "monotone": all(b > a for a, b in zip(vals, vals[1:])),
            "per_prompt_monotone": sum(all(b > a for a, b in zip(r, r[1:])) for r in zip(*dr.attrs["per_prompt"])),
            "prompts": len(STEER_PROMPTS)}


def run_steer(args) -> int:
    """Only the steering dose-response, on a finished `interp sae train` folder."""
    import torch

    import interp
    from interp.store import ActivationStore
    from probes.dictionaries import load
    from probes.dictionaries.report import consistent_features, feature_matrix, top_contexts
    from recipes.models import load as load_model

    torch.set_grad_enabled(False)
    out = Path(args.path)
    lm = interp.attach(load_model(args.model))
    sae = load(out / "dictionary")
    site = sae.cfg.site
    store = ActivationStore.open(out / "store")
    W, _ = _windows(lm, args.seq_len, args.seed)
    rows = store.tensors()
    F = feature_matrix(sae, rows[site])
    freq = (F > 0).float().mean(0)
    cand = [j for j in freq.argsort(descending=True).tolist() if 1e-3 < freq[j] < 0.05][:200]
    ctx = top_contexts(sae, rows, W[:-args.eval_windows], lm.tokenizer, cand, k=10, F=F)
    chosen = [c for c in consistent_features(ctx) if c[1].isalpha() and len(c[1]) > 1]
    if not chosen:
        print("no feature with consistent top contexts")
        return 1
    res = _steering(lm, sae, site, chosen[0], ctx, W[:-args.eval_windows], F, out)
    (out / "steering_summary.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0
