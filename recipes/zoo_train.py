"""Training recipes for the project-trained zoo models (docs/ZOO.md).

    python -m recipes.zoo_train shapes-diffusion --out interp/zoo/weights/shapes-diffusion --overwrite-shipped
    python -m recipes.zoo_train shapes-flow      --out interp/zoo/weights/shapes-flow --overwrite-shipped
    python -m recipes.zoo_train physics          --out interp/zoo/weights/physics --overwrite-shipped
    python -m recipes.zoo_train physics --smoke --out /tmp/p      # a few seconds

Seeded (``--seed``), resumable (``--resume`` continues from ``<out>/train_state.safetensors``, tensors +
JSON written atomically every ``--save-every`` steps; nothing is unpickled), a tqdm progress bar, and the
final metrics are printed and written to ``<out>/metrics.json``. The default ``--out`` is a new folder
``interp-out/zoo-train/<name>``; writing into the shipped ``interp/zoo/weights/`` needs ``--overwrite-shipped``.
The architectures are in ``interp/zoo/architectures.py``. ``register(subparsers)`` mounts all this as
``interp zoo-train``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.io import atomic_write_json, honour_umask, load_state, save_state

NAMES = ("shapes-diffusion", "shapes-flow", "physics")


# ============================================================================ architectures
# (in interp/zoo/architectures.py; imported here for the trainers and for code that imported them from here)
from interp.zoo.architectures import (  # noqa: E402,F401
    MAX_TOKENS,
    build_diffusion_pipeline,
    build_flow_pipeline,
    build_tokenizer,
    identity_vae,
)


# ============================================================================ helpers
class EMA:
    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in modules.items()}

    @torch.no_grad()
    def update(self, modules, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for n, m in modules.items():
            for k, v in m.state_dict().items():
                s = self.shadow[n][k]
                if v.dtype.is_floating_point:
                    s.mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    s.copy_(v)

    def copy_to(self, modules):
        for n, m in modules.items():
            m.load_state_dict(self.shadow[n])


def _lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + base * 0.1 * 0.5


def _machine() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
            f"torch {torch.__version__} CPU, threads={torch.get_num_threads()}").strip()


class ShapesData:
    """A fixed pool of rendered training images (train captions only), drawn from by index."""

    def __init__(self, seed: int, size: int):
        from interp.zoo import shapes

        images, captions, _ = shapes.sample(seed, size)
        self.x = shapes.to_tensor(images)
        self.captions = captions
        self.rng = np.random.default_rng(seed + 1)

    def batch(self, n: int, p_uncond: float):
        idx = self.rng.integers(0, len(self.captions), n)
        caps = ["" if self.rng.random() < p_uncond else self.captions[i] for i in idx]
        return self.x[idx], caps


STATE_FILE = "train_state.safetensors"  # tensors + a JSON skeleton (interp.io.save_state): nothing is unpickled


def _save_state(path: Path, step: int, modules, opt, ema, data):
    from interp.io import save_state

    save_state(path, {"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                      "opt": opt.state_dict(), "ema": ema.shadow, "data_rng": data.rng.bit_generator.state,
                      "torch_rng": torch.get_rng_state()})


def _load_state(path: Path, modules, opt, ema, data) -> int:
    from interp.io import load_state

    st = load_state(path)
    for k, m in modules.items():
        m.load_state_dict(st["modules"][k])
    opt.load_state_dict(st["opt"])
    ema.shadow = st["ema"]
    data.rng.bit_generator.state = st["data_rng"]
    torch.set_rng_state(st["torch_rng"])
    return st["step"]


def _state_path(out: Path, resume: bool) -> Path:
    """The resumable state file in `out`; a legacy pickle-based train_state.pt is refused, never loaded."""
    legacy = out / "train_state.pt"
    if resume and legacy.exists() and not (out / STATE_FILE).exists():
        from interp.errors import InterpError

        raise InterpError(f"{legacy} is an old pickle-based training state, which interp no longer loads (unpickling "
                          "can run code from the file): delete it and train from the start (or --init from weights)")
    return out / STATE_FILE


def write_files_manifest(out: Path) -> Path:
    """sha256 of every weight / config file of a saved zoo model (what the zoo loader checks before loading)."""
    from interp.io import atomic_write_json, file_sha256
    from interp.zoo.catalog import FILES_MANIFEST, MANIFEST_SKIP

    files = {p.relative_to(out).as_posix(): file_sha256(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in MANIFEST_SKIP and not p.name.startswith(".")}
    return atomic_write_json(out / FILES_MANIFEST, {"format": "interp.files/1", "files": files})


def save_pipeline(pipe, out: Path) -> None:
    """``save_pretrained`` (safetensors); model_index.json names the stock diffusers class (the zoo's
    pipeline subclasses write it that way themselves; a stock pipeline needs nothing)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        pipe.save_pretrained(str(out), safe_serialization=True)
    finally:
        dlog.set_verbosity(level)


# ============================================================================ evaluation
def evaluate_image_pipeline(pipe, n_per_caption: int = 32, captions=None, seed: int = 1234,
                            num_inference_steps: int | None = None, batch: int = 32, **call_kw) -> dict:
    """Generate ``n_per_caption`` images per held-out caption and score every attribute."""
    from interp.zoo import scorers, shapes

    attrs = captions if captions is not None else shapes.held_out_attributes()
    kw = dict(call_kw)
    if num_inference_steps is not None:
        kw["num_inference_steps"] = num_inference_steps
    per_caption: dict = {}
    totals: dict[str, list] = {k: [] for k in scorers.SCORERS}
    pipe.set_progress_bar_config(disable=True)
    for ci, a in enumerate(attrs):
        imgs = []
        done = 0
        while done < n_per_caption:
            b = min(batch, n_per_caption - done)
            g = torch.Generator().manual_seed(seed + 1000 * ci + done)
            out = pipe([a.caption()] * b, generator=g, output_type="np", **kw).images
            imgs.append(out)
            done += b
        acc = scorers.accuracy(np.concatenate(imgs), a)
        per_caption[a.caption()] = acc
        for k, v in acc.items():
            totals[k].append(v)
    return {"n_captions": len(attrs), "n_per_caption": n_per_caption,
            "accuracy": {k: float(np.mean(v)) for k, v in totals.items()}, "per_caption": per_caption}


# ============================================================================ trainers
def _image_common(args, pipe, trainable: dict, loss_fn, name: str, defaults: dict):
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (defaults["smoke_steps"] if args.smoke else defaults["steps"])
    bs = args.batch_size or (8 if args.smoke else defaults["batch"])
    data = ShapesData(args.seed, 64 if args.smoke else defaults["pool"])
    params = [p for m in trainable.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr or defaults["lr"], weight_decay=0.0)
    ema = EMA(trainable, defaults["ema"])
    state_path = _state_path(out, args.resume)
    start = 0
    if args.resume and state_path.exists():
        start = _load_state(state_path, trainable, opt, ema, data)
        print(f"resumed {name} at step {start}")
    for m in trainable.values():
        m.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, disable=args.quiet)
    running = None
    for step in bar:
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, args.lr or defaults["lr"], warmup=min(200, steps // 5 + 1))
        x0, caps = data.batch(bs, p_uncond=0.1)
        loss = loss_fn(x0, caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(trainable, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            _save_state(state_path, step + 1, trainable, opt, ema, data)
        if args.max_minutes and (time.time() - t0) > 60 * args.max_minutes:
            print(f"stopping at step {step + 1}: --max-minutes reached")
            _save_state(state_path, step + 1, trainable, opt, ema, data)
            steps = step + 1
            break
    train_time = time.time() - t0
    ema.copy_to(trainable)
    for m in trainable.values():
        m.eval()
    save_pipeline(pipe, out)
    honour_umask(out)
    write_files_manifest(out)
    metrics = {"name": name, "train_steps": steps, "batch_size": bs, "final_loss": running,
               "train_wall_s": round(train_time, 1), "machine": _machine(), "seed": args.seed,
               "command": "python -m recipes.zoo_train " + " ".join(args.argv), "smoke": bool(args.smoke)}
    atomic_write_json(out / "metrics.json", metrics, indent=2)
    if state_path.exists() and not args.keep_state:
        state_path.unlink()
    if args.no_eval:
        return metrics
    return evaluate_saved(args, pipe)


def _call_defaults(pipe) -> str:
    """The pipeline's default step count and guidance scale, as words."""
    import inspect

    # the first class in the MRO whose __call__ names its parameters (a zoo subclass takes **kwargs)
    params = next(p for p in (inspect.signature(c.__call__).parameters for c in type(pipe).__mro__)
                  if "guidance_scale" in p)
    guidance = (getattr(pipe, "plain_call_kwargs", None) or {}).get("guidance_scale", params["guidance_scale"].default)
    return f"{params['num_inference_steps'].default} steps, guidance {guidance}"


def evaluate_saved(args, pipe=None) -> dict:
    """Score held-out captions of a saved image model and merge the result into its metrics.json."""
    from interp.zoo import catalog, shapes

    out = Path(args.out)
    if pipe is None:
        pipe = catalog.load_trained(args.name, path=out)
    held = shapes.held_out_attributes()
    caps = held[:1] if args.smoke else held[: args.eval_captions]
    n_eval = 2 if args.smoke else args.eval_samples
    t0 = time.time()
    ev = evaluate_image_pipeline(pipe, n_per_caption=n_eval, captions=caps, seed=args.seed + 99,
                                 num_inference_steps=2 if args.smoke else None, batch=32)
    f = out / "metrics.json"
    metrics = json.loads(f.read_text()) if f.exists() else {"name": args.name}
    metrics["held_out"] = ev
    metrics["eval_wall_s"] = round(time.time() - t0, 1)
    metrics["eval"] = ("smoke" if args.smoke else
                       f"{ev['n_per_caption']} samples x {ev['n_captions']} held-out captions "
                       f"(of {len(held)}), pipeline defaults ({_call_defaults(pipe)}), seed {args.seed + 99}")
    atomic_write_json(f, metrics, indent=2)
    return metrics


def train_shapes_diffusion(args):
    pipe = build_diffusion_pipeline(args.seed, width=8 if args.smoke else 16)
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, te = pipe.unet, pipe.text_encoder
    if args.init:
        from interp.zoo.catalog import load_trained

        src = load_trained("shapes-diffusion", path=args.init)
        unet.load_state_dict(src.unet.state_dict())
        te.load_state_dict(src.text_encoder.state_dict())

    def loss_fn(x0, caps):
        emb, _ = pipe.encode_prompt(caps, "cpu", 1, False)
        noise = torch.randn_like(x0)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (x0.shape[0],))
        xt = ddpm.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        return torch.nn.functional.mse_loss(pred, x0)  # x0 ("sample") prediction

    return _image_common(args, pipe, {"unet": unet, "text_encoder": te}, loss_fn, "shapes-diffusion",
                         dict(steps=3000, smoke_steps=3, batch=32, pool=20000, lr=1e-3, ema=0.995))


def train_shapes_flow(args):
    pipe = build_flow_pipeline(args.seed, heads=2 if args.smoke else 4, layers=2 if args.smoke else 4)
    tr, te1, te2 = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2
    if args.init:
        from interp.zoo.catalog import load_trained

        src = load_trained("shapes-flow", path=args.init)
        for mine, theirs in ((tr, src.transformer), (te1, src.text_encoder), (te2, src.text_encoder_2)):
            mine.load_state_dict(theirs.state_dict())

    def loss_fn(x0, caps):
        emb, _, pooled, _ = pipe.encode_prompt(caps, caps, None, device="cpu", do_classifier_free_guidance=False)
        noise = torch.randn_like(x0)
        n = x0.shape[0]
        sigma = torch.where(torch.rand(n) < 0.5, torch.sigmoid(torch.randn(n)), torch.rand(n)).clamp(1e-3, 1.0)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        pred = tr(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb, pooled_projections=pooled).sample
        return torch.nn.functional.mse_loss(pred, noise - x0)

    return _image_common(args, pipe, {"transformer": tr, "text_encoder": te1, "text_encoder_2": te2}, loss_fn,
                         "shapes-flow", dict(steps=2000, smoke_steps=3, batch=32, pool=20000, lr=1e-3, ema=0.995))


def train_physics(args):
    from interp.zoo import physics as P

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (5 if args.smoke else 5000)
    bs = args.batch_size or (16 if args.smoke else 64)
    lr = args.lr or 1e-3
    model = P.PhysicsSurrogate() if not args.smoke else P.PhysicsSurrogate(d_model=16, n_layers=2, d_mlp=32)
    if args.init:
        model.load_state_dict(P.PhysicsSurrogate.from_pretrained(args.init).state_dict())
    unroll = max(1, args.rollout_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state_path = _state_path(out, args.resume)
    start = 0
    if args.resume and state_path.exists():
        st = load_state(state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        print(f"resumed physics at step {start}")
    t0 = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="physics", disable=args.quiet)
    running = None
    for step in bar:
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, lr, warmup=min(200, steps // 5 + 1))
        # loss on the change from the start state, normalised per sample so slow regimes count as much
        # as fast ones; with --rollout-steps K the model is unrolled K steps (gradients through the
        # whole rollout), which penalises the error that accumulates over a rollout (e.g. a spurious
        # diffusivity) and not only the one-step error
        if unroll == 1:
            u, nxt, kappa, vel = P.sample_pairs(args.seed * 1_000_003 + step, bs)
            traj = torch.stack([u, nxt], dim=1)
        else:
            traj, kappa, vel = P.sample_rollouts(args.seed * 1_000_003 + step, bs, unroll)
            n_blob = int(round(args.blob_fraction * bs))
            if n_blob:  # part of the batch from fresh single blobs (see --blob-fraction)
                bt, bk, bv = P.sample_blob_rollouts(args.seed * 1_000_003 + step + 7_777_777, n_blob, unroll)
                traj = torch.cat([traj[n_blob:], bt])
                kappa, vel = torch.cat([kappa[n_blob:], bk]), torch.cat([vel[n_blob:], bv])
        pred, loss = traj[:, 0], 0.0
        for k in range(1, unroll + 1):
            pred = model(pred, kappa, vel)
            inc, pinc = traj[:, k] - traj[:, 0], pred - traj[:, 0]
            loss = loss + (((pinc - inc) ** 2).sum(-1) / (inc**2).sum(-1).clamp_min(1e-6)).mean() / unroll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.5f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            save_state(state_path, {"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict()})
    train_time = time.time() - t0
    model.eval()
    model.save_pretrained(out)
    honour_umask(out)
    write_files_manifest(out)
    err = P.one_step_error(model)
    kfit = P.kappa_fit_report(model)
    worst = max(v["rel_err"] for v in kfit.values())
    metrics = {"name": "physics", **err, "kappa_fit_rollout_steps": 20, "train_rollout_steps": unroll,
               "train_blob_fraction": args.blob_fraction, "kappa_fit_max_rel_err": worst,
               "kappa_fit": kfit, "train_steps": steps, "batch_size": bs, "final_loss": running,
               "train_wall_s": round(train_time, 1), "machine": _machine(), "seed": args.seed,
               "command": "python -m recipes.zoo_train " + " ".join(args.argv), "smoke": bool(args.smoke)}
    atomic_write_json(out / "metrics.json", metrics, indent=2)
    if state_path.exists() and not args.keep_state:
        state_path.unlink()
    return metrics


def evaluate_physics(args) -> dict:
    from interp.zoo import catalog
    from interp.zoo import physics as P

    out = Path(args.out)
    model = catalog.load_trained("physics", path=out)
    f = out / "metrics.json"
    metrics = json.loads(f.read_text()) if f.exists() else {"name": "physics"}
    kfit = P.kappa_fit_report(model)
    metrics.update(P.one_step_error(model), kappa_fit=kfit,
                   kappa_fit_max_rel_err=max(v["rel_err"] for v in kfit.values()))
    atomic_write_json(f, metrics, indent=2)
    return metrics


TRAINERS = {"shapes-diffusion": train_shapes_diffusion, "shapes-flow": train_shapes_flow, "physics": train_physics}


# ============================================================================ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=NAMES, help="which zoo model to train")
    p.add_argument("--out", default=None, help="output folder (default interp-out/zoo-train/<name>, a new folder)")
    p.add_argument("--overwrite-shipped", action="store_true",
                   help="allow --out to be the shipped weights folder interp/zoo/weights/<name> (replaces them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps: seconds (for tests)")
    p.add_argument("--resume", action="store_true", help=f"continue from <out>/{STATE_FILE}")
    p.add_argument("--init", default=None, help="initialise the weights from a saved pipeline folder")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-state", action="store_true", help=f"keep {STATE_FILE} after finishing")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early (and save state) after this long")
    p.add_argument("--eval-samples", type=int, default=32, help="samples per held-out caption")
    p.add_argument("--eval-captions", type=int, default=8, help="how many held-out captions to score (of 8)")
    p.add_argument("--no-eval", action="store_true", help="train and save only")
    p.add_argument("--eval-only", action="store_true", help="score the model already saved in --out")
    p.add_argument("--rollout-steps", type=int, default=1,
                   help="physics: unroll the surrogate this many steps in the training loss (default 1 = one-step)")
    p.add_argument("--blob-fraction", type=float, default=0.0,
                   help="physics with --rollout-steps: this fraction of each batch starts from one fresh narrow "
                        "blob (the states a rollout's diffusivity is measured on) instead of a random field")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_out(args) -> None:
    """A default --out under interp-out/; the shipped weights are replaced only with --overwrite-shipped."""
    from interp.errors import InterpError
    from interp.zoo.catalog import WEIGHTS_DIR

    if args.out is None:
        args.out = str(Path("interp-out") / "zoo-train" / args.name)
    out, shipped = Path(args.out).resolve(), WEIGHTS_DIR.resolve()
    inside = out == shipped or shipped in out.parents
    if inside and not getattr(args, "overwrite_shipped", False):
        raise InterpError(f"--out {args.out} is inside the shipped weights ({shipped}); training "
                          "there replaces them: choose another folder, or pass --overwrite-shipped")
    for name in ("steps", "batch_size", "save_every"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "save_every" else 1):
            raise InterpError(f"--{name.replace('_', '-')} must be >= "
                              f"{0 if name == 'save_every' else 1}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise InterpError(f"--lr must be a finite number > 0, got {args.lr}")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    _check_out(args)
    if not hasattr(args, "argv"):
        args.argv = [args.name, "--out", args.out, "--seed", str(args.seed)] + (["--smoke"] if args.smoke else [])
    if args.eval_only:
        metrics = evaluate_physics(args) if args.name == "physics" else evaluate_saved(args)
    else:
        with torch.enable_grad():  # a caller may have switched autograd off in this process
            metrics = TRAINERS[args.name](args)
    shown = {k: v for k, v in metrics.items() if k not in ("kappa_fit", "held_out")}
    if "held_out" in metrics:
        shown["held_out_accuracy"] = metrics["held_out"]["accuracy"]
    print(json.dumps(shown, indent=2, default=str))
    return metrics


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``zoo-train`` subcommand (``func=cli``, which calls ``run``) to an argparse subparsers object."""
    p = subparsers.add_parser("zoo-train", help="train a zoo model (shapes-diffusion, shapes-flow, physics)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cli)
    return p


def cli(args) -> int:
    """The subcommand's entry point: train (or evaluate), print the metrics, exit code 0."""
    run(args)
    return 0


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m recipes.zoo_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    main()
