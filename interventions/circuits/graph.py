"""The computational graph of a decoder LM, read off the adapter's sites.

Nodes that write into the residual stream (senders): ``input`` (the block-0 input: token plus position
embeddings), every query head ``a{l}.h{h}`` and every MLP ``m{l}``. Places that read it (receivers): each
head's q input ``a{l}.h{h}<q>``, each key/value head's k and v inputs, each MLP's input ``m{l}`` and the
``logits``. With grouped-query attention a key/value head serves a group of query heads, so its k/v input
is one receiver ``a{l}.kv{g}<k>`` (names of multi-head models are MIB's: ``a{l}.h{h}<k>``).

An edge ``s -> r`` is s's output as it enters r's input (before r's norm). Everything is exact only where
the residual stream is a plain sum of these outputs; `Parts` checks that on a real run and refuses models
where it is not (post-attention norms, parallel residual blocks, fused q/k/v layouts it does not know).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

import interp
from interp.errors import InterpError


class CircuitGraphError(InterpError, ValueError):
    """The model's residual stream cannot be split into the edges of a circuit graph."""


class CircuitArgumentError(InterpError, ValueError):
    """A circuits function was called with an argument it cannot use."""


LN1 = ("input_layernorm", "ln_1", "ln1")
LN2 = ("post_attention_layernorm", "ln_2", "ln2")
POST_NORMS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


def _first(mod: nn.Module, names) -> str | None:
    for n in names:
        if hasattr(mod, n) and isinstance(getattr(mod, n), nn.Module):
            return n
    return None


@dataclass(frozen=True)
class Receiver:
    name: str
    kind: str          # "q" | "k" | "v" | "mlp" | "logits"
    layer: int         # n_layers for logits
    head: int | None = None


@dataclass
class Graph:
    """Senders, receivers and the valid edges between them (a sender feeds every later receiver)."""

    senders: list[str]
    sender_layer: list[int]          # -1 for input
    receivers: list[Receiver]
    src: torch.Tensor                # [E] sender index of each edge
    dst: torch.Tensor                # [E] receiver index of each edge
    n_layers: int
    n_heads: int
    n_kv: int
    meta: dict = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.src.numel())

    @cached_property
    def edge_names(self) -> list[str]:
        """MIB names of the edges, computed once (src and dst are not changed after construction)."""
        return [f"{self.senders[s]}->{self.receivers[r].name}" for s, r in zip(self.src.tolist(), self.dst.tolist())]

    def index(self, name: str) -> int:
        names = self.edge_names
        if name not in self._positions:
            import difflib

            close = difflib.get_close_matches(name, names, n=3)
            raise CircuitGraphError(f"no edge {name!r} in this graph ({self.n_edges} edges); did you mean {close}?")
        return self._positions[name]

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.edge_names)}

    def mask(self) -> torch.Tensor:
        """[n_senders, n_receivers] bool: which pairs are edges."""
        m = torch.zeros(len(self.senders), len(self.receivers), dtype=torch.bool)
        m[self.src, self.dst] = True
        return m


def _kv_name(l: int, g: int, c: str, gqa: bool) -> str:
    return f"a{l}.kv{g}<{c}>" if gqa else f"a{l}.h{g}<{c}>"


def build_graph(n_layers: int, n_heads: int, n_kv: int) -> Graph:
    """The residual-stream graph of a sequential pre-norm transformer."""
    gqa = n_kv != n_heads
    senders, s_layer = ["input"], [-1]
    receivers: list[Receiver] = []
    src: list[int] = []
    dst: list[int] = []

    def connect(r: Receiver, n_avail: int):
        receivers.append(r)
        src.extend(range(n_avail))
        dst.extend([len(receivers) - 1] * n_avail)

    for l in range(n_layers):
        avail = len(senders)
        for h in range(n_heads):
            connect(Receiver(f"a{l}.h{h}<q>", "q", l, h), avail)
        for c in "kv":
            for g in range(n_kv):
                connect(Receiver(_kv_name(l, g, c, gqa), c, l, g), avail)
        senders += [f"a{l}.h{h}" for h in range(n_heads)]
        s_layer += [l] * n_heads
        connect(Receiver(f"m{l}", "mlp", l), len(senders))
        senders.append(f"m{l}")
        s_layer.append(l)
    connect(Receiver("logits", "logits", n_layers), len(senders))
    return Graph(senders, s_layer, receivers, torch.tensor(src), torch.tensor(dst), n_layers, n_heads, n_kv)


class Parts:
    """Where a model's senders write and receivers read, and the weights that split heads.

    Built from the hf_lm adapter's sites: `blocks.{l}.resid_pre` / `resid_mid` / `attn.z` / `mlp.out`,
    per-head `attn.q/k/v` where the model has separate projections, and GPT-2's fused `c_attn` through a
    raw site. `check(lm, inputs)` verifies on a real run that the residual stream is the sum of the
    senders' outputs (and their biases) to 1e-4, so every edge computation here is exact.
    """

    def __init__(self, lm: interp.Instrumented):
        ad = lm.adapter
        if ad.family not in ("hf_lm",):
            raise CircuitGraphError(f"circuit graphs need a Hugging Face decoder LM (the hf_lm adapter); this model "
                                    f"attaches as {ad.family!r}. Attach the HF model itself.")
        if getattr(ad, "parallel", False):
            raise CircuitGraphError("this model has parallel attention/MLP blocks; circuit graphs here assume "
                                    "sequential blocks (the MLP reads the residual after attention)")
        self.lm, self.ad = lm, ad
        self.L, self.H, self.KV = ad.n_layers, ad.n_heads, ad.n_kv
        blocks = ad.model.get_submodule(ad.blocks)
        self.blocks = [blocks[i] for i in range(self.L)]
        blk = self.blocks[0]
        if any(hasattr(blk, n) for n in POST_NORMS):
            raise CircuitGraphError(f"{type(blk).__name__} normalises the attention/MLP output before the residual "
                                    "add (Gemma 2 style), so a head's contribution is not linear in its output; "
                                    "edges are not defined exactly for it")
        self.attn_name = _first(blk, ("self_attn", "attn", "attention"))
        self.mlp_name = _first(blk, ("mlp", "feed_forward"))
        self.ln1_name, self.ln2_name = _first(blk, LN1), _first(blk, LN2)
        if None in (self.attn_name, self.mlp_name, self.ln1_name, self.ln2_name):
            raise CircuitGraphError(f"cannot find attention, MLP and both norms in {type(blk).__name__} "
                                    f"(found attn={self.attn_name}, mlp={self.mlp_name}, norms={self.ln1_name}, "
                                    f"{self.ln2_name})")
        attn = getattr(blk, self.attn_name)
        self.fused = hasattr(attn, "c_attn") and not hasattr(attn, "q_proj")
        if self.fused and type(attn.c_attn).__name__ != "Conv1D":
            raise CircuitGraphError(f"fused q/k/v projection of type {type(attn.c_attn).__name__} has an unknown "
                                    "column layout; only GPT-2's Conv1D c_attn is split into heads")
        self.o_name = "c_proj" if self.fused else _first(attn, ("o_proj", "dense", "out_proj"))
        self.d = ad.model.get_submodule(f"{ad.blocks}.0.{self.ln1_name}").weight.shape[-1]
        self.dh = self._o_weight(0).shape[1]
        self.graph = build_graph(self.L, self.H, self.KV)

    # -- module paths and sites --------------------------------------------------------------------
    def bp(self, l: int) -> str:
        return f"{self.ad.blocks}.{l}"

    def ln1(self, l: int) -> nn.Module:
        return getattr(self.blocks[l], self.ln1_name)

    def ln2(self, l: int) -> nn.Module:
        return getattr(self.blocks[l], self.ln2_name)

    def proj_site(self, l: int, c: str) -> str:
        if self.fused:
            return f"module:{self.bp(l)}.{self.attn_name}.c_attn"
        return f"blocks.{l}.attn.{c}"

    def mlp_in_site(self, l: int) -> str:
        return f"module:{self.bp(l)}.{self.mlp_name}:input"

    # -- weights ---------------------------------------------------------------------------------
    def _o_weight(self, l: int) -> torch.Tensor:
        o = getattr(getattr(self.blocks[l], self.attn_name), self.o_name)
        if self.fused:  # Conv1D: y = x @ W, W [H*dh, d]
            return o.weight.detach().view(self.H, -1, o.weight.shape[1])
        return o.weight.detach().T.reshape(self.H, -1, o.weight.shape[0])  # Linear W [d, H*dh] -> [H, dh, d]

    def proj_weight(self, l: int, c: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W [n, dh, d] and bias [n, dh] of the q, k or v projection (n query or key/value heads)."""
        attn = getattr(self.blocks[l], self.attn_name)
        n = self.H if c == "q" else self.KV
        if self.fused:
            i = "qkv".index(c)
            W = attn.c_attn.weight.detach()[:, i * self.d:(i + 1) * self.d].T.reshape(n, -1, self.d)
            b = attn.c_attn.bias.detach()[i * self.d:(i + 1) * self.d].reshape(n, -1)
            return W, b
        lin = getattr(attn, {"q": "q_proj", "k": "k_proj", "v": "v_proj"}[c])
        W = lin.weight.detach().reshape(n, -1, lin.weight.shape[1])
        return W, None if lin.bias is None else lin.bias.detach().reshape(n, -1)

    # -- reading and writing one projection's heads in its site tensor ------------------------------
    def heads_of(self, x: torch.Tensor, c: str) -> torch.Tensor:
        """The [N, P, n, dh] heads of projection c inside its site tensor."""
        if self.fused:
            i = "qkv".index(c)
            return x[..., i * self.d:(i + 1) * self.d].unflatten(-1, (self.H, self.dh))
        return x

    def with_heads(self, x: torch.Tensor, c: str, new: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """x with heads `heads` of projection c replaced by new[..., heads, :]."""
        out = x.clone()
        view = self.heads_of(out, c)
        view[..., heads, :] = new[..., heads, :].to(x.dtype)
        return out

    # -- sender outputs --------------------------------------------------------------------------
    def head_outputs(self, z: torch.Tensor, l: int) -> torch.Tensor:
        """[N, T, H, dh] head inputs of o_proj -> [H, N, T, d] each head's write into the residual."""
        return torch.einsum("nthe,hed->hntd", z, self._o_weight(l).to(z.dtype))

    def capture_sites(self) -> list[str]:
        sites = []
        for l in range(self.L):
            sites += [f"blocks.{l}.resid_pre", f"blocks.{l}.resid_mid", f"blocks.{l}.attn.z", f"blocks.{l}.mlp.out"]
        return sites + [f"blocks.{self.L - 1}.resid_post"]

    def sender_outputs(self, cache) -> torch.Tensor:
        """[S, N, T, d] every sender's output in graph order, from a run that captured `capture_sites()`."""
        outs = [cache["blocks.0.resid_pre"][None]]
        for l in range(self.L):
            outs += [self.head_outputs(cache[f"blocks.{l}.attn.z"], l), cache[f"blocks.{l}.mlp.out"][None]]
        return torch.cat(outs)

    def check(self, cache, atol: float = 1e-4) -> None:
        """Refuse a model whose residual stream is not input + heads + MLPs (+ constant biases)."""
        outs = self.sender_outputs(cache).float()
        s_layer = torch.tensor(self.graph.sender_layer)
        scale = cache["blocks.0.resid_pre"].float().abs().max().clamp_min(1e-6)
        is_mlp = torch.tensor([n.startswith("m") for n in self.graph.senders])
        checks = [(f"blocks.{l}.resid_pre", s_layer < l) for l in range(self.L)]
        checks += [(f"blocks.{l}.resid_mid", (s_layer < l) | ((s_layer == l) & ~is_mlp)) for l in range(self.L)]
        checks.append((f"blocks.{self.L - 1}.resid_post", s_layer < self.L))
        for name, keep in checks:
            got = cache[name]
            want = outs[keep].sum(0)
            rest = got.float() - want
            rest = rest - rest.mean(dim=(0, 1), keepdim=True)  # biases are constant over items and positions
            if float(rest.abs().max() / scale.max(got.float().abs().max())) > atol:
                raise CircuitGraphError(f"the residual stream at {name} is not the sum of the embedding, "
                                        f"head and MLP outputs (off by {float(rest.abs().max()):.3g}); this "
                                        f"architecture ({type(self.blocks[0]).__name__}) has a component between "
                                        "a head's output and the residual, so edges are not exact for it")
