"""1D advection-diffusion data and a small transformer surrogate.

PDE on the periodic domain [0, 1):   u_t + c u_x = kappa u_xx
solved exactly in Fourier space: u_hat_k(t) = u_hat_k(0) exp(-(i c k + kappa k^2) t), k = 2 pi m.

Regimes: ``KAPPAS`` x ``VELOCITIES``. The surrogate advances the field by ``DT``:
``model(u, kappa, velocity) -> u_next``; ``model.rollout(u0, steps, kappa, velocity)`` iterates it.
Its blocks are ``blocks.{i}`` (each ``attn`` then ``mlp``, pre-norm residual), so sites are
``blocks.{i}`` / ``blocks.{i}.attn`` / ``blocks.{i}.mlp``; token 0 is the regime token
(``cond``), tokens 1..N are the grid points.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

N_GRID = 64
LENGTH = 1.0
DT = 0.02
KAPPAS = (0.002, 0.004, 0.008, 0.016)
VELOCITIES = (-0.2, -0.1, 0.0, 0.1, 0.2)


# ----------------------------------------------------------------------------- data
def grid(n: int = N_GRID) -> np.ndarray:
    return (np.arange(n) + 0.5) * LENGTH / n


def exact_evolve(u0, t, kappa, velocity):
    """Exact solution at time(s) ``t`` from ``u0`` (..., N). Broadcasts t/kappa/velocity over the batch."""
    u0 = np.asarray(u0, dtype=np.float64)
    n = u0.shape[-1]
    k = 2 * np.pi * np.fft.rfftfreq(n, d=LENGTH / n)
    t = np.asarray(t, dtype=np.float64)[..., None]
    kappa = np.asarray(kappa, dtype=np.float64)[..., None]
    velocity = np.asarray(velocity, dtype=np.float64)[..., None]
    factor = np.exp(-(1j * velocity * k + kappa * k**2) * t)
    return np.fft.irfft(np.fft.rfft(u0, axis=-1) * factor, n=n, axis=-1)


def gaussian_blob(center: float = 0.5, width: float = 0.04, amplitude: float = 1.0, n: int = N_GRID) -> np.ndarray:
    """Periodic Gaussian bump (sum over images so it is smooth across the boundary)."""
    x = grid(n)
    u = np.zeros(n)
    for shift in (-1, 0, 1):
        u += np.exp(-((x - center + shift * LENGTH) ** 2) / (2 * width**2))
    return amplitude * u


def exact_blob_rollout(steps: int, kappa: float, velocity: float, center=0.5, width=0.04, amplitude=1.0, n=N_GRID):
    """(steps + 1, N) exact rollout of one Gaussian blob, spaced by ``DT``."""
    u0 = gaussian_blob(center, width, amplitude, n)
    return exact_evolve(u0[None], np.arange(steps + 1) * DT, kappa, velocity)


def random_initial(rng: np.random.Generator, batch: int, n: int = N_GRID) -> np.ndarray:
    """1-3 Gaussian blobs of random centre, width and amplitude, plus weak low modes."""
    out = np.zeros((batch, n))
    x = grid(n)
    for b in range(batch):
        for _ in range(rng.integers(1, 4)):
            out[b] += gaussian_blob(rng.uniform(0, 1), rng.uniform(0.025, 0.08), rng.uniform(0.3, 1.2), n)
        if rng.random() < 0.3:
            for m in (1, 2, 3):
                out[b] += 0.1 * rng.normal() * np.sin(2 * np.pi * m * x + rng.uniform(0, 2 * np.pi))
    return out


def sample_pairs(seed: int, batch: int, n: int = N_GRID):
    """Training pairs: (u_t, u_{t+DT}, kappa, velocity), float32 tensors; regimes from the grid."""
    rng = np.random.default_rng(seed)
    u0 = random_initial(rng, batch, n)
    kappa = np.asarray(KAPPAS)[rng.integers(0, len(KAPPAS), batch)]
    vel = np.asarray(VELOCITIES)[rng.integers(0, len(VELOCITIES), batch)]
    t0 = rng.uniform(0, 1.0, batch)
    u = exact_evolve(u0, t0, kappa, vel)
    nxt = exact_evolve(u0, t0 + DT, kappa, vel)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    return f(u), f(nxt), f(kappa), f(vel)


def sample_rollouts(seed: int, batch: int, steps: int, n: int = N_GRID):
    """Exact trajectories for rollout training: ((B, steps + 1, N) states spaced by ``DT``, kappa, velocity)."""
    rng = np.random.default_rng(seed)
    u0 = random_initial(rng, batch, n)
    kappa = np.asarray(KAPPAS)[rng.integers(0, len(KAPPAS), batch)]
    vel = np.asarray(VELOCITIES)[rng.integers(0, len(VELOCITIES), batch)]
    t0 = rng.uniform(0, 1.0, batch)
    traj = np.stack([exact_evolve(u0, t0 + k * DT, kappa, vel) for k in range(steps + 1)], axis=1)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    return f(traj), f(kappa), f(vel)


def sample_blob_rollouts(seed: int, batch: int, steps: int, n: int = N_GRID):
    """Like sample_rollouts, from one fresh Gaussian blob each (random centre, width 0.03-0.06, amplitude
    0.5-1.2): the narrow single-blob states from which a rollout's diffusivity is read (kappa_fit_report)."""
    rng = np.random.default_rng(seed)
    kappa = np.asarray(KAPPAS)[rng.integers(0, len(KAPPAS), batch)]
    vel = np.asarray(VELOCITIES)[rng.integers(0, len(VELOCITIES), batch)]
    u0 = np.stack([gaussian_blob(rng.uniform(0, 1), rng.uniform(0.03, 0.06), rng.uniform(0.5, 1.2), n)
                   for _ in range(batch)])
    traj = np.stack([exact_evolve(u0, k * DT, kappa, vel) for k in range(steps + 1)], axis=1)
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    return f(traj), f(kappa), f(vel)


# ----------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = (p(x).view(b, t, h, d // h).transpose(1, 2) for p in (self.q, self.k, self.v))
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(z.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PhysicsSurrogate(nn.Module):
    """Transformer that maps (u_t, kappa, velocity) -> u_{t+DT} on an N-point periodic grid.

    The field is divided by its per-sample max |u| (the PDE is linear, so the step commutes with
    scaling) and multiplied back at the end. embed: circular Conv1d (kernel 9) of the field, no
    position embedding (the step is translation-equivariant on the periodic grid); a regime token
    (MLP of log10 kappa and velocity) is prepended as token 0.
    head: u_next = u + scale * out_scale * Linear(ln_f(h)).
    """

    def __init__(self, n_grid: int = N_GRID, d_model: int = 64, n_heads: int = 4, n_layers: int = 4,
                 d_mlp: int = 128, out_scale: float = 0.05, dt: float = DT, kernel: int = 9):
        super().__init__()
        self.config = dict(n_grid=n_grid, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                           d_mlp=d_mlp, out_scale=out_scale, dt=dt, kernel=kernel)
        self.embed = nn.Conv1d(1, d_model, kernel_size=kernel, padding=kernel // 2, padding_mode="circular")
        self.cond = nn.Sequential(nn.Linear(2, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.blocks = nn.ModuleList([Block(d_model, n_heads, d_mlp) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)
        self.out_scale = out_scale
        self.dt = dt

    @staticmethod
    def regime_features(kappa, velocity, batch: int, device) -> torch.Tensor:
        def per_sample(v) -> torch.Tensor:  # a scalar is broadcast to the batch, a vector kept as it is
            t = torch.as_tensor(v, dtype=torch.float32, device=device)
            return t.reshape(-1).expand(batch) if torch.as_tensor(v).numel() == 1 else t

        kappa, velocity = per_sample(kappa), per_sample(velocity)
        return torch.stack([(torch.log10(kappa) + 2.2) / 0.5, velocity / 0.2], -1)

    def forward(self, u: torch.Tensor, kappa, velocity) -> torch.Tensor:
        """u: (B, N) -> (B, N), one step of ``dt``."""
        b = u.shape[0]
        scale = u.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        h = self.embed((u / scale)[:, None, :]).transpose(1, 2)
        c = self.cond(self.regime_features(kappa, velocity, b, u.device))[:, None, :]
        x = torch.cat([c, h], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return u + scale * self.out_scale * self.head(self.ln_f(x[:, 1:])).squeeze(-1)

    @torch.no_grad()
    def rollout(self, u0: torch.Tensor, steps: int, kappa=0.004, velocity=0.0) -> torch.Tensor:
        """Iterate ``steps`` times from u0 ((N,) or (B, N)); returns (steps + 1, N) or (B, steps + 1, N)."""
        single = u0.dim() == 1
        u = torch.as_tensor(u0, dtype=torch.float32).reshape(-1, u0.shape[-1])
        out = [u]
        for _ in range(steps):
            u = self(u, kappa, velocity)
            out.append(u)
        traj = torch.stack(out, dim=1)
        return traj[0] if single else traj

    # -- persistence (safetensors + config.json)
    def save_pretrained(self, path) -> None:
        from interp.io import atomic_write_safetensors, atomic_write_text

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(path / "model.safetensors", self.state_dict())
        config = {"_class_name": "PhysicsSurrogate", **self.config}
        atomic_write_text(path / "config.json", json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> PhysicsSurrogate:
        from safetensors.torch import load_file

        from interp.io import check_safetensors

        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("_class_name", None)
        model = cls(**cfg)
        check_safetensors(path / "model.safetensors")  # a truncated file is named
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.to(device).eval()


def one_step_error(model: PhysicsSurrogate, seed: int = 12345, batch: int = 512) -> dict[str, float]:
    """Held-out one-step relative L2 errors: of the state and of the increment (u_next - u)."""
    u, nxt, kappa, vel = sample_pairs(seed, batch)
    with torch.no_grad():
        pred = model(u, kappa, vel)
    rel = ((pred - nxt).norm(dim=-1) / nxt.norm(dim=-1)).mean().item()
    rel_inc = ((pred - nxt).norm(dim=-1) / (nxt - u).norm(dim=-1).clamp_min(1e-8)).mean().item()
    return {"one_step_rel_l2": rel, "one_step_rel_l2_increment": rel_inc}


def kappa_fit_report(model: PhysicsSurrogate, steps: int = 20, width: float = 0.04) -> dict[str, dict]:
    """Fit kappa from the surrogate's rollout of a blob, for every (kappa, velocity) regime."""
    from .scorers import fit_kappa

    out = {}
    for kappa in KAPPAS:
        for vel in VELOCITIES:
            u0 = torch.tensor(gaussian_blob(0.5, width), dtype=torch.float32)
            traj = model.rollout(u0, steps, kappa, vel).numpy()
            fit = fit_kappa(traj, DT)
            out[f"kappa={kappa},v={vel}"] = {"true": kappa, "fit": fit, "rel_err": abs(fit - kappa) / kappa}
    return out
