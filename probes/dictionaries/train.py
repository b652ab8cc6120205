"""Training sparse dictionaries on activation rows (a tensor, an ActivationStore or any iterable of batches).

Loss, in the scaled units where E||x s||^2 = d_in (s set from the first batch):
    recon = mean_rows ||y_hat - y||^2 / d_out
    relu:       + l1 * mean_rows sum_i f_i ||W_dec_i||             (dead features resampled)
    jumprelu:   + l0 * mean_rows sum_i H(pre_i - theta_i)          (straight-through; dead features resampled)
    topk/batch: + aux_coef * AuxK                                  (the k_aux = d_out / 2 largest dead latents
                                                                    reconstruct the residual; Gao et al. 2024)
Decoder rows are kept at unit norm after every step (for ReLU the gradient parallel to each row is removed
first). A feature is dead when it has not fired on the last `dead_after` rows.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .sae import DictConfig, Dictionary, DictionaryError


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 4096
    lr: float = 1e-3
    l1: float = 3e-3               # relu sparsity coefficient
    l0: float = 1e-3               # jumprelu sparsity coefficient
    aux_coef: float = 1 / 32       # topk / batchtopk AuxK
    dead_after: int = 200_000      # rows without firing -> dead
    resample_every: int | None = 500  # relu / jumprelu: resample dead features every n steps (None: never)
    warmup: int = 50               # linear lr warmup steps
    sparsity_warmup: int = 200     # linear ramp of l1 / l0
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None
    progress: bool = True


TRAINER_STATE = "trainer.safetensors"  # optimizer state, step, log (interp.io.save_state; no pickle)


@dataclass
class TrainLog:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead: list[float] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    resampled: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else math.nan

    def to_json(self) -> dict:
        return {**asdict(self), "rows_per_s": self.rows_per_s}


def _pairs(data: Any, site: str | None, out_site: str | None, batch_size: int, seed: int) -> Iterator:
    """(x, y) batches forever (epochs repeat with new seeds); y is None for autoencoders."""
    if isinstance(data, torch.Tensor) or (isinstance(data, tuple) and isinstance(data[0], torch.Tensor)):
        X, Y = (data, None) if isinstance(data, torch.Tensor) else data
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(X.shape[0], generator=g)
            for i in range(0, X.shape[0] - batch_size + 1, batch_size):
                j = perm[i:i + batch_size]
                yield X[j], None if Y is None else Y[j]
    epoch = 0
    while True:
        src = data.batches(batch_size, seed=seed + epoch) if hasattr(data, "batches") else data
        n = 0
        for b in src:
            n += 1
            if isinstance(b, dict):
                if site not in b:
                    raise DictionaryError(f"the data has no rows for site {site!r}; it holds {sorted(b)}")
                yield b[site], (b[out_site] if out_site else None)
            else:
                yield (b, None) if isinstance(b, torch.Tensor) else (b[0], b[1])
        if n == 0 or not hasattr(data, "batches"):
            if n == 0:
                raise DictionaryError("the training data yielded no batches")
            return
        epoch += 1


class Trainer:
    """Holds a dictionary, its optimiser and dead-feature counters; `run(data)` trains it."""

    def __init__(self, sae: Dictionary | DictConfig, cfg: TrainConfig | None = None):
        self.cfg = cfg or TrainConfig()
        if not isinstance(sae, Dictionary):
            sae = Dictionary(sae)
            sae.reset_parameters(seed=self.cfg.seed)
        self.sae = sae.to(self.cfg.device)
        params = [p for p in self.sae.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999))
        self.since = torch.zeros(self.sae.d_sae, dtype=torch.long, device=self.cfg.device)
        self.step, self.scaled = 0, False
        self.log = TrainLog()
        self._thr: list[float] = []

    # -- one step ------------------------------------------------------------------------------
    def _scale(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        s = self.sae
        s.in_scale.fill_(math.sqrt(x.shape[-1] / x.float().pow(2).sum(-1).mean().clamp_min(1e-12)))
        t = x if y is None else y
        s.out_scale.fill_(math.sqrt(t.shape[-1] / t.float().pow(2).sum(-1).mean().clamp_min(1e-12)))
        with torch.no_grad():  # start b_dec at the (scaled) mean: the geometric-median-style init, cheaply
            s.b_dec.copy_((t.float() * s.out_scale).mean(0).to(s.b_dec.dtype))
        self.scaled = True

    def loss(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        s, c = self.sae, self.cfg
        target = (x if y is None else y).to(s.W_dec.dtype) * s.out_scale
        pre = s.pre_acts(x)
        f = s.activate(pre, train=True)
        y_hat = s.reconstruct(x, f) * s.out_scale
        err = y_hat - target
        sse = err.pow(2).sum(-1)
        total_var = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        loss = sse.mean() / target.shape[-1]
        ramp = min(1.0, (self.step + 1) / max(1, c.sparsity_warmup))
        fired = (f > 0)
        if s.kind == "relu":
            loss = loss + ramp * c.l1 * (f * s.W_dec.norm(dim=1)).sum(-1).mean()
        elif s.kind == "jumprelu":
            from .sae import _JumpHeaviside

            loss = loss + ramp * c.l0 * _JumpHeaviside.apply(pre, s.log_threshold.exp(), s.cfg.bandwidth).sum(-1).mean()
        else:
            dead = self.since >= c.dead_after
            if dead.any():
                k_aux = min(int(dead.sum()), max(1, target.shape[-1] // 2))
                vals, idx = torch.where(dead[None], torch.relu(pre), -torch.inf).topk(k_aux, dim=-1)
                e_hat = torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0)) @ s.W_dec
                aux = (e_hat - err.detach()).pow(2).sum(-1).mean() / total_var
                loss = loss + c.aux_coef * min(1.0, int(dead.sum()) / k_aux) * aux
            if s.kind == "batchtopk":
                pos = f[fired]
                if pos.numel():
                    self._thr.append(float(pos.detach().min()))
        stats = {"fvu": float(sse.detach().mean() / total_var), "l0": float(fired.sum(-1).float().mean()),
                 "fired": fired.any(0)}
        return loss, stats

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict:
        c, s = self.cfg, self.sae
        x = x.to(c.device, torch.float32)
        y = None if y is None else y.to(c.device, torch.float32)
        if not self.scaled:
            self._scale(x, y)
        for g in self.opt.param_groups:
            g["lr"] = c.lr * min(1.0, (self.step + 1) / max(1, c.warmup))
        loss, stats = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.W_dec.grad is not None:  # keep unit-norm rows: drop the gradient along each row
            W = s.W_dec.data
            s.W_dec.grad -= (s.W_dec.grad * W).sum(1, keepdim=True) * W / W.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        self.opt.step()
        with torch.no_grad():
            s.W_dec /= s.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.since += x.shape[0]
        self.since[stats["fired"]] = 0
        self.step += 1
        self.log.rows += x.shape[0]
        if c.resample_every and s.kind in ("relu", "jumprelu") and self.step % c.resample_every == 0:
            self.resample(x, y)
        stats["loss"] = float(loss.detach())
        return stats

    @torch.no_grad()
    def resample(self, x: torch.Tensor, y: torch.Tensor | None) -> int:
        """Re-initialise dead features on inputs the dictionary reconstructs worst (Bricken et al. 2023):
        decoder row = the normalised residual direction, encoder column = that direction at 0.2 x the mean
        live encoder norm, bias 0, and their Adam moments reset."""
        s = self.sae
        dead = (self.since >= self.cfg.dead_after).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        target = (x if y is None else y) * s.out_scale
        err = (target - s.reconstruct(x, s.encode(x)) * s.out_scale).pow(2).sum(-1)
        g = torch.Generator(device=x.device).manual_seed(self.cfg.seed + self.step)
        pick = torch.multinomial(err + 1e-12, dead.numel(), replacement=dead.numel() > x.shape[0], generator=g)
        if y is None:
            dirs = target[pick] - s.b_dec
        else:
            dirs = target[pick] - s.reconstruct(x[pick], s.encode(x[pick])) * s.out_scale
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = torch.ones(s.d_sae, dtype=torch.bool, device=x.device)
        alive[dead] = False
        enc_norm = s.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        s.W_dec[dead] = dirs.to(s.W_dec.dtype)
        xin = x[pick] * s.in_scale - (s.b_dec if s.cfg.center_input else 0)
        xin = xin / xin.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        s.W_enc[:, dead] = (xin.T * 0.2 * enc_norm).to(s.W_enc.dtype)
        s.b_enc[dead] = 0
        for p in (s.W_dec, s.W_enc, s.b_enc):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    if p is s.W_enc:
                        st[key][:, dead] = 0
                    else:
                        st[key][dead] = 0
        self.since[dead] = 0
        self.log.resampled += int(dead.numel())
        return int(dead.numel())

    # -- the loop ------------------------------------------------------------------------------
    def run(self, data: Any, steps: int | None = None) -> Dictionary:
        c = self.cfg
        steps = steps or c.steps
        self._resume()
        it = _pairs(data, self.sae.cfg.site, self.sae.cfg.out_site, c.batch_size, c.seed + self.step)
        bar = tqdm(total=steps, initial=self.step, desc=f"interp sae ({self.sae.kind})", disable=not c.progress)
        t0 = time.perf_counter()
        try:
            while self.step < steps:
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                st = self.train_step(x, y)
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == steps:
                    self._record(st)
                    bar.set_postfix(fvu=f"{st['fvu']:.3f}", l0=f"{st['l0']:.1f}", dead=f"{self.log.dead[-1]:.2f}")
                if c.checkpoint_every and c.checkpoint_dir and self.step % c.checkpoint_every == 0:
                    self.checkpoint()
        finally:
            bar.close()
            self.log.seconds += time.perf_counter() - t0
        if self._thr:
            self.sae.threshold.fill_(sum(self._thr[-200:]) / len(self._thr[-200:]))
        if c.checkpoint_dir:
            self.checkpoint()
        return self.sae

    def _record(self, st: dict) -> None:
        lg = self.log
        lg.steps.append(self.step)
        lg.loss.append(st["loss"])
        lg.fvu.append(st["fvu"])
        lg.l0.append(st["l0"])
        lg.dead.append(float((self.since >= self.cfg.dead_after).float().mean()))

    def checkpoint(self) -> Path:
        """The dictionary (interp format, verified) plus the trainer state, both renamed into place."""
        from interp.io import save_state

        from .formats import save

        d = Path(self.cfg.checkpoint_dir)
        save(self.sae, d / "dictionary", extra={"train": asdict(self.cfg), "log": self.log.to_json()})
        state = {"step": self.step, "opt": self.opt.state_dict(), "since": self.since.cpu(), "log": asdict(self.log),
                 "thr": [float(t) for t in self._thr[-200:]]}
        save_state(d / TRAINER_STATE, state)  # safetensors + JSON: a resume never unpickles
        return d

    def _resume(self) -> None:
        c = self.cfg
        if not c.checkpoint_dir or not (Path(c.checkpoint_dir) / TRAINER_STATE).exists() or self.step:
            return
        from interp.io import load_state

        from .formats import load

        loaded = load(Path(c.checkpoint_dir) / "dictionary")
        self.sae.load_state_dict(loaded.state_dict())
        state = load_state(Path(c.checkpoint_dir) / TRAINER_STATE)
        self.opt.load_state_dict(state["opt"])
        self.since, self.step = state["since"].to(c.device), int(state["step"])
        self.log, self._thr = TrainLog(**state["log"]), list(state["thr"])
        self.scaled = True


def train(cfg: DictConfig | Dictionary, data: Any, train_cfg: TrainConfig | None = None,
          **overrides) -> tuple[Dictionary, TrainLog]:
    """Train a dictionary on `data` ([N, d] tensor, (X, Y) for transcoders, an ActivationStore, or an iterable of
    {site: rows} / tensor batches); keyword overrides go to TrainConfig. Returns (dictionary, log)."""
    tc = train_cfg or TrainConfig()
    if overrides:
        tc = TrainConfig(**{**asdict(tc), **overrides})
    t = Trainer(cfg, tc)
    sae = t.run(data)
    return sae.eval(), t.log


def planted(n: int, d: int, n_features: int, p: float = 0.02, seed: int = 0, noise: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic rows x = sum_i a_i D_i with known unit directions D [n_features, d], each feature on with
    probability p and magnitude |N(1, 0.25^2)| (+ Gaussian noise): the ground truth for a dictionary learner."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    on = torch.rand(n, n_features, generator=g) < p
    mag = (1 + 0.25 * torch.randn(n, n_features, generator=g)).abs()
    x = (on * mag) @ D
    if noise:
        x = x + noise * torch.randn(n, d, generator=g)
    return x, D


def recovery(sae: Dictionary, D: torch.Tensor) -> torch.Tensor:
    """For each planted direction, the max cosine with any decoder direction ([n_features])."""
    return (D / D.norm(dim=1, keepdim=True) @ sae.directions().T.to(D.dtype)).max(dim=1).values


__all__ = ["TrainConfig", "TrainLog", "Trainer", "train", "planted", "recovery"]
