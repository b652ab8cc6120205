"""Sparse dictionaries: SAEs (ReLU, TopK, BatchTopK, JumpReLU) and transcoders, as one module.

    f     = act((x * s - b_dec * [sae]) @ W_enc + b_enc)        features [.., d_sae]
    x_hat = (f @ W_dec + b_dec) / s_out                          reconstruction (or the target site, transcoders)

`s` and `s_out` are fixed input / output scales (set by the trainer so that E||x s||^2 = d_in; 1 for
loaded dictionaries). act is ReLU, TopK (k largest of ReLU per row), BatchTopK (k * rows largest over the
whole batch in training; at inference a JumpReLU with the threshold estimated in training) or JumpReLU
(pre * (pre > theta), theta = exp(log_threshold), trained with straight-through pseudo-derivatives of
Rajamanoharan et al. 2024). A transcoder reads one site and writes another: its input is not centred by b_dec.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from interp.errors import InterpError

KINDS = ("relu", "topk", "batchtopk", "jumprelu")


class DictionaryError(InterpError, ValueError):
    """A dictionary's configuration or weights do not fit together (or do not fit the site)."""


@dataclass
class DictConfig:
    d_in: int
    d_sae: int
    kind: str = "relu"
    k: int | None = None               # topk / batchtopk
    d_out: int | None = None           # transcoders: the output site's width (None: an SAE, d_out = d_in)
    site: str | None = None            # where it reads
    out_site: str | None = None        # transcoders: where it writes
    bandwidth: float = 1e-3            # jumprelu: width of the straight-through rectangle
    center_input: bool | None = None   # subtract b_dec from the input (SAE default True, transcoder False)
    skip: bool = False                 # a linear skip path: out += x @ W_skip.T (sparsify transcoders)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DictionaryError(f"dictionary kind {self.kind!r} is unknown; choose one of {KINDS}")
        if self.kind in ("topk", "batchtopk") and not (self.k and 0 < self.k <= self.d_sae):
            raise DictionaryError(f"kind={self.kind!r} needs k in 1..{self.d_sae} (features kept per row), "
                                  f"got {self.k}")
        if self.center_input is None:
            self.center_input = self.d_out is None

    @property
    def transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def out_dim(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    def to_json(self) -> dict:
        return asdict(self)


class _JumpHeaviside(torch.autograd.Function):
    """H(pre - theta): gradient to theta through the rectangle kernel (straight-through), none to pre."""

    @staticmethod
    def forward(ctx, pre, theta, bw):
        ctx.save_for_backward(pre, theta)
        ctx.bw = bw
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        k = ((pre - theta).abs() < ctx.bw / 2).to(g.dtype) / ctx.bw
        return None, -(g * k).sum(tuple(range(g.dim() - 1))), None


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta): exact gradient to pre above theta, straight-through gradient to theta."""

    @staticmethod
    def forward(ctx, pre, theta, bw):
        ctx.save_for_backward(pre, theta)
        ctx.bw = bw
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        on = (pre > theta).to(g.dtype)
        k = ((pre - theta).abs() < ctx.bw / 2).to(g.dtype) / ctx.bw
        return g * on, -(g * theta * k).sum(tuple(range(g.dim() - 1))), None


class Dictionary(nn.Module):
    """An SAE or transcoder: encode, decode, forward (reconstruction), and the decoder directions."""

    def __init__(self, cfg: DictConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        d, m, o = cfg.d_in, cfg.d_sae, cfg.out_dim
        self.W_enc = nn.Parameter(torch.empty(d, m, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(m, o, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(o, dtype=dtype))
        self.log_threshold = nn.Parameter(torch.full((m,), -3.0, dtype=dtype), requires_grad=cfg.kind == "jumprelu")
        self.W_skip = nn.Parameter(torch.zeros(o, d, dtype=dtype)) if cfg.skip else None
        self.register_buffer("threshold", torch.zeros((), dtype=dtype))   # batchtopk inference threshold
        self.register_buffer("in_scale", torch.ones((), dtype=dtype))
        self.register_buffer("out_scale", torch.ones((), dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        W = torch.randn(self.cfg.d_sae, self.cfg.out_dim, generator=g, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec.copy_(W.to(self.W_dec.dtype) * 0.1 if self.cfg.transcoder else W)
        d = self.cfg.d_in
        enc = W.T if not self.cfg.transcoder else torch.randn(d, self.cfg.d_sae, generator=g) / d ** 0.5
        self.W_enc.copy_(enc.to(self.W_enc.dtype))

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype) * self.in_scale
        if self.cfg.center_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, train: bool = False) -> torch.Tensor:
        kind = self.cfg.kind
        if kind == "relu":
            return torch.relu(pre)
        if kind == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg.bandwidth)
        if kind == "batchtopk" and not train:
            return pre * (pre > self.threshold).to(pre.dtype) if float(self.threshold) > 0 else self._topk(pre)
        if kind == "batchtopk":
            flat = torch.relu(pre).reshape(-1)
            n = min(flat.numel(), self.cfg.k * max(1, flat.numel() // self.cfg.d_sae))
            vals, idx = flat.topk(n, sorted=False)
            return torch.zeros_like(flat).scatter(0, idx, vals).reshape(pre.shape)
        return self._topk(pre)

    def _topk(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = torch.relu(pre).topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of inputs [..., d_in]."""
        self._check(x, self.cfg.d_in, "input")
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_out] in the site's units (scales undone), in the dictionary's dtype."""
        return (f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x, self.encode(x))

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """decode(f), plus the skip path of x when the dictionary has one."""
        out = self.decode(f)
        return out if self.W_skip is None else out + x.to(self.W_skip.dtype) @ self.W_skip.T

    def directions(self) -> torch.Tensor:
        """Unit decoder directions [d_sae, d_out] (what a feature writes, in the site's basis)."""
        W = self.W_dec.detach().float()
        return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _check(self, x: torch.Tensor, d: int, what: str) -> None:
        if x.shape[-1] != d:
            where = f" trained at {self.cfg.site!r}" if self.cfg.site else ""
            raise DictionaryError(f"the dictionary{where} takes {what}s of width {d}, got a tensor of shape "
                                  f"{tuple(x.shape)}: splice it at a site of the width it was trained on")

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm, moving the norm into the encoder (the function is unchanged for ReLU)."""
        n = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec /= n[:, None]
        if self.cfg.kind == "relu" and not self.cfg.transcoder:
            self.W_enc *= n[None, :]
            self.b_enc *= n


__all__ = ["Dictionary", "DictConfig", "DictionaryError", "KINDS"]
