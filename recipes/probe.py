"""`interp probe`: probe maps (where a label is linearly readable) and DAS / IIA (whether it is causal),
each beside the same measurement on a randomly initialised copy of the model.

    interp probe                                   # SmolLM2, country of a landmark, 30 layers x 3 positions
    interp probe --data prompts.jsonl              # {"prompt", "label", "subject"?, "group"?} per line
    interp probe --das-layers 4,8,12,16            # + IIA at those layers (last position)
    interp probe --model toy                       # the constructed model with a known causal site
    interp probe --model shapes-diffusion          # a pipeline: colour over text-encoder layers x tokens
                                                   # and denoiser blocks x steps
"""
from __future__ import annotations

import json
import time
from pathlib import Path

# Country -> landmarks; the country names are single SmolLM2 tokens with a leading space.
LANDMARKS: dict[str, list[str]] = {
    "France": ["Eiffel Tower", "Louvre", "Notre-Dame Cathedral", "Mont Saint-Michel", "Arc de Triomphe",
               "Palace of Versailles"],
    "Italy": ["Colosseum", "Leaning Tower of Pisa", "Trevi Fountain", "Sistine Chapel", "Rialto Bridge",
              "Duomo di Milano"],
    "Japan": ["Mount Fuji", "Tokyo Tower", "Fushimi Inari Shrine", "Himeji Castle", "Kinkaku-ji", "Tokyo Skytree"],
    "China": ["Great Wall", "Forbidden City", "Terracotta Army", "Tiananmen Square", "Potala Palace", "Summer Palace"],
    "Egypt": ["Great Pyramid of Giza", "Great Sphinx", "Valley of the Kings", "Karnak Temple", "Abu Simbel",
              "Suez Canal"],
    "India": ["Taj Mahal", "Red Fort", "Qutub Minar", "Gateway of India", "Golden Temple", "Hawa Mahal"],
    "Greece": ["Acropolis", "Parthenon", "Temple of Poseidon", "Meteora monasteries", "Palace of Knossos",
               "Oracle of Delphi"],
    "England": ["Big Ben", "Buckingham Palace", "Stonehenge", "Tower of London", "Tower Bridge", "Westminster Abbey"],
}
TEMPLATES = ("The {} is located in the country of", "Last summer we visited the {}, which is in",
             "A photo of the {}. This famous place is in", "Tourists who want to see the {} travel to")


def landmark_task() -> dict[str, list]:
    """The templated landmark -> country set: prompts with country, landmark (type/group) and template labels."""
    rows = {"prompt": [], "country": [], "landmark": [], "template": [], "subject": []}
    for t, template in enumerate(TEMPLATES):
        for country, places in LANDMARKS.items():
            for place in places:
                rows["prompt"].append(template.format(place))
                rows["country"].append(country)
                rows["landmark"].append(place)
                rows["template"].append(t)
                rows["subject"].append(place)
    return rows


def read_jsonl(path: str) -> dict[str, list]:
    rows = {"prompt": [], "label": [], "subject": [], "group": []}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rows["prompt"].append(rec["prompt"])
            rows["label"].append(rec["label"])
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}:{n}: each line must be a JSON object with 'prompt' and 'label' "
                             f"(optional 'subject', 'group'): {e}") from None
        rows["subject"].append(rec.get("subject"))
        rows["group"].append(rec.get("group", rec.get("subject", rec["prompt"])))
    if any(s is None for s in rows["subject"]):
        rows.pop("subject")
    return rows


def register(sub) -> None:
    p = sub.add_parser("probe", help="probe maps over layers x positions and DAS/IIA, beside a random-init model")
    p.add_argument("--model", default="smollm2", help="zoo name, local folder, or 'toy' (default: %(default)s)")
    p.add_argument("--data", help="JSONL with prompt, label[, subject, group] (default: the landmark -> country set)")
    p.add_argument("--sites", default="blocks.*.resid_post", help="site pattern (default: %(default)s)")
    p.add_argument("--positions", default=None,
                   help="comma list of subject_first, subject_last, subject_mean, last or integers "
                        "(default: subject_first,subject_last,last with subjects, else last)")
    p.add_argument("--probe", default="ridge", choices=("ridge", "logistic"))
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    p.add_argument("--das-layers", default="", help="comma list of layers for DAS/IIA at --das-pos")
    p.add_argument("--das-pos", default="-1", help="position for DAS (integer; default: last token)")
    p.add_argument("--das-k", type=int, default=16, help="subspace size (default: %(default)s; a 1-dimensional "
                   "subspace often cannot carry a many-valued concept, and its low IIA reads as a misleading null)")
    p.add_argument("--das-pairs", type=int, default=240)
    p.add_argument("--das-epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache", help="folder for memory-mapped activations (resumable)")
    p.add_argument(
        "--steps", type=int, default=10, help="sampling steps for diffusion pipelines (default: %(default)s)"
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="CFG scale for diffusion pipelines (default: the pipeline's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="interp-out/probe", help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def _positions(spec: str | None, has_subjects: bool) -> dict:
    from probes import SubjectOf

    if spec is None:
        spec = "subject_first,subject_last,last" if has_subjects else "last"
    out = {}
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name.startswith("subject_"):
            if not has_subjects:
                raise ValueError(f"position {name!r} needs a subject per prompt ('subject' in --data)")
            out[name] = SubjectOf(name.split("_", 1)[1])
        elif name == "last":
            out[name] = -1
        else:
            try:
                out[name] = int(name)
            except ValueError:
                raise ValueError(f"unknown position {name!r}: use subject_first, subject_last, "
                                 "subject_mean, last or an integer") from None
    return out


def run(args) -> int:
    import torch

    torch.set_grad_enabled(False)
    if args.model == "toy":
        return run_toy(args)
    import interp
    from probes import lm_probe_maps, peak, plot_maps
    from recipes.models import load

    t0 = time.perf_counter()
    obj = load(args.model)
    if hasattr(obj, "scheduler") and (hasattr(obj, "unet") or hasattr(obj, "transformer")):
        return run_diffusion(obj, args)
    lm = interp.attach(obj)
    if args.data:
        rows = read_jsonl(args.data)
        label, types, groups = "label", "group", "group"
    else:
        rows = landmark_task()
        label, types, groups = "country", "landmark", "landmark"
    subjects = rows.get("subject")
    positions = _positions(args.positions, subjects is not None)
    labels = {k: v for k, v in rows.items() if k not in ("prompt",)}
    res, data = lm_probe_maps(lm, rows["prompt"], labels, label, sites=args.sites, positions=positions,
                              subjects=subjects, types=types, groups=groups, kind=args.probe,
                              random_baseline=not args.no_random, seed=args.seed, batch_size=args.batch_size,
                              path=args.cache, k=args.folds)
    out = Path(args.out)
    res.attrs["model"] = args.model
    answers = _answers(lm, rows, label) if lm.tokenizer is not None else None
    res.attrs["behaviour_accuracy"] = answers["accuracy"] if answers else None
    js = res.save(out / "probe_map")
    png = plot_maps(res, out / "probe_map.png", title=f"{args.model}: linear probe for {label}")
    summary = {"n": len(rows["prompt"]), "chance": res.attrs["chance"], "map": str(js), "png": str(png),
               "behaviour_accuracy": res.attrs["behaviour_accuracy"]}
    for model in res.coord("model"):
        for meas in res.coord("measure"):
            cell, val = peak(res, meas, model)
            summary[f"{model}/{meas}"] = {"peak": cell, "value": round(val, 4)}
            print(f"{model:12s} {meas:15s} peak {val:.3f} at {cell}")
    if args.das_layers:
        if answers is None:
            raise ValueError("DAS reads the label words as next tokens; they must be single tokens")
        summary["iia"] = _das(lm, rows, label, answers, args, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"chance {res.attrs['chance']:.3f}; heatmaps: {png}; numbers: {js}; {time.perf_counter() - t0:.0f} s")
    return 0


def _answers(lm, rows, label) -> dict | None:
    """The model's own answer among the label words for every prompt (None when a label is not one token)."""
    from probes.das import _readout

    classes = sorted(set(rows[label]))
    ids = [lm.tokenizer(" " + str(c), add_special_tokens=False)["input_ids"] for c in classes]
    if any(len(i) != 1 for i in ids):
        return None
    cand = [i[0] for i in ids]
    length = [len(lm.tokens(p)) for p in rows["prompt"]]
    correct = [False] * len(length)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(length):
        by_len.setdefault(n, []).append(i)
    for members in by_len.values():                      # equal lengths batch without padding
        for s in range(0, len(members), 32):
            idx = members[s:s + 32]
            out = lm.run([rows["prompt"][i] for i in idx], last_only=True)
            pred = _readout(out.logits, cand).argmax(-1).tolist()
            for i, p in zip(idx, pred):
                correct[i] = classes[p] == rows[label][i]
    return {"classes": classes, "candidates": cand, "correct": correct, "length": length,
            "accuracy": sum(correct) / len(correct)}


def _das(lm, rows, label, answers: dict, args, out: Path) -> dict:
    """IIA of the label at --das-layers (resid_post, --das-pos) on same-length prompt pairs of one template."""
    import random

    import torch

    from probes import iia_map, plot_maps
    classes, cand, correct, length = (answers[k] for k in ("classes", "candidates", "correct", "length"))
    key = rows.get("template", [0] * len(length))
    pool = [i for i in range(len(length)) if correct[i]]
    pairs = [(b, s) for b in pool for s in pool if b != s and key[b] == key[s] and length[b] == length[s]
             and rows[label][b] != rows[label][s]]
    random.Random(args.seed).shuffle(pairs)
    pairs = pairs[:args.das_pairs]
    if len(pairs) < 20:
        raise ValueError(f"only {len(pairs)} same-length pairs the model answers correctly; DAS needs more")
    base = [rows["prompt"][b] for b, _ in pairs]
    source = [rows["prompt"][s] for _, s in pairs]
    targets = torch.tensor([classes.index(rows[label][s]) for _, s in pairs])
    layers = [int(x) for x in args.das_layers.split(",")]
    res = iia_map(lm, [f"blocks.{l}.resid_post" for l in layers], [int(args.das_pos)], base, source, targets,
                  k=args.das_k, candidates=cand, random_baseline=not args.no_random, seed=args.seed,
                  epochs=args.das_epochs, batch_size=args.batch_size, lr=0.01)
    res.attrs.pop("alignment", None)
    res.save(out / "iia")
    plot_maps(res, out / "iia.png", title=f"{args.model}: IIA of {label} (k={args.das_k}, {len(pairs)} pairs)")
    summary = {"pairs": len(pairs), "k": args.das_k, "pos": int(args.das_pos)}
    for m, model in enumerate(res.coord("model")):
        for q, meas in enumerate(res.coord("measure")):
            summary[f"{model}/{meas}"] = dict(zip(layers, [round(float(v), 4) for v in res.values[m, q, :, 0]]))
    print(json.dumps(summary, indent=1))
    return summary


def run_toy(args) -> int:
    """The constructed model: probe map and IIA map over every layer x position."""
    import interp
    from probes import iia_map, lm_probe_maps, plot_maps
    from probes.toy import ToyLM

    out = Path(args.out)
    m = ToyLM()
    lm = interp.attach(m)
    X, lab = m.dataset()
    res, _ = lm_probe_maps(lm, list(X), lab, "V", positions=[0, 1, 2, 3], types="pair", groups="pair",
                           random_baseline=not args.no_random, seed=args.seed, k=args.folds)
    res.save(out / "toy_probe_map")
    plot_maps(
        res, out / "toy_probe_map.png", title=f"toy: probe for V (written at layer {m.write_layer}, last position)"
    )
    base, source, tgt = m.counterfactual_pairs(600, seed=args.seed)
    iia = iia_map(lm, [f"blocks.{i}.resid_post" for i in range(len(m.model.layers))], [0, 1, 2, 3], base, source, tgt,
                  k=2, candidates=list(range(m.C)), random_baseline=not args.no_random, seed=args.seed,
                  epochs=10, lr=0.05, batch_size=100)
    iia.attrs.pop("alignment", None)
    iia.save(out / "toy_iia")
    plot_maps(iia, out / "toy_iia.png", title="toy: IIA of V (k=2), trained vs random-init")
    print(f"probe map and IIA map written to {out}")
    return 0


def shapes_task() -> dict[str, list]:
    """Captions of the zoo's coloured-shapes world: every colour x shape x position, large and solid."""
    from interp.zoo.shapes import COLOURS, POSITIONS, SHAPES

    where = {"left": "on the left", "center": "in the center", "right": "on the right"}
    rows = {"prompt": [], "colour": [], "shape": [], "subject": []}
    for c in COLOURS:
        for s in SHAPES:
            for p in POSITIONS:
                rows["prompt"].append(f"a large {c} {s} {where[p]}, solid")
                rows["colour"].append(c)
                rows["shape"].append(s)
                rows["subject"].append(c)
    return rows


def run_diffusion(pipe, args) -> int:
    """Colour probe maps of a text-to-image pipeline: text-encoder layers x tokens, denoiser blocks x steps."""
    from probes import peak, plot_maps
    from probes.maps import diffusion_probe_maps

    if args.data:
        rows = read_jsonl(args.data)
        label, groups = "label", "group"
    else:
        rows = shapes_task()
        label, groups = "colour", "shape"
    labels = {k: v for k, v in rows.items() if k != "prompt"}
    text, den = diffusion_probe_maps(pipe, rows["prompt"], labels, label, subjects=rows.get("subject"),
                                     steps=args.steps, guidance=args.guidance, seed=args.seed, groups=groups,
                                     kind=args.probe, random_baseline=not args.no_random, batch_size=args.batch_size,
                                     path=args.cache, k=args.folds)
    out = Path(args.out)
    summary = {"n": len(rows["prompt"]), "chance": text.attrs["chance"], "steps": args.steps}
    for name, res in (("text_encoder", text), ("denoiser", den)):
        res.attrs["model"] = args.model
        res.save(out / f"{name}_probe_map")
        plot_maps(res, out / f"{name}_probe_map.png", title=f"{args.model}: linear probe for {label} ({name})")
        for model in res.coord("model"):
            for meas in res.coord("measure"):
                cell, val = peak(res, meas, model)
                summary[f"{name}/{model}/{meas}"] = {"peak": cell, "value": round(val, 4)}
                print(f"{name:12s} {model:12s} {meas:15s} peak {val:.3f} at {cell}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"chance {summary['chance']:.3f}; maps and heatmaps in {out}")
    return 0
