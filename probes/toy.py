"""A constructed language model whose causal variable is written at one known site.

Inputs are 4 tokens [a, b, filler, q] with a, b, q in {0..C-1}. Block `write_layer` computes the
variable V = (a + b) mod C from positions 0 and 1 and writes it one-hot into C dedicated residual
dimensions at the last position; the next block reads V and q there and writes the answer
y = (V + q) mod C, which the unembedding turns into logits over the answer tokens 0..C-1.
Every other block is a small per-position MLP that writes only into scratch dimensions.

So V is linearly readable exactly at (layer >= write_layer, last position), and interchanging its
subspace there from a source input makes the output (V_source + q_base) mod C, while patching the
whole last-position vector also carries q_source and does not.
The weights are set by hand; `probes.baseline.random_copy` re-initialises them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ToyOutput:
    logits: torch.Tensor


class _Layout:
    def __init__(self, C: int, n_fill: int, scratch: int):
        self.C = C
        self.vocab = 3 * C + n_fill                      # a tokens, b tokens, q tokens, fillers
        self.u = list(range(0, C))                       # V, one-hot
        self.o = list(range(C, 2 * C))                   # answer y, one-hot
        self.emb = list(range(2 * C, 2 * C + self.vocab))
        self.scratch = list(range(2 * C + self.vocab, 2 * C + self.vocab + scratch))
        self.d = 2 * C + self.vocab + scratch

    def a(self, i): return i
    def b(self, i): return self.C + i
    def q(self, i): return 2 * self.C + i
    def fill(self, i): return 3 * self.C + i


class ScratchBlock(nn.Module):
    """h + MLP(h), the MLP reading the token dimensions and writing only the scratch dimensions."""

    def __init__(self, lay: _Layout, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mlp = nn.Sequential(nn.Linear(lay.d, 16), nn.Tanh(), nn.Linear(16, lay.d, bias=False))
        with torch.no_grad():
            w_in = torch.zeros(16, lay.d)
            w_in[:, lay.emb] = torch.randn(16, len(lay.emb), generator=g)
            self.mlp[0].weight.copy_(w_in)
            self.mlp[0].bias.zero_()
            w_out = torch.zeros(lay.d, 16)
            w_out[lay.scratch] = 0.3 * torch.randn(len(lay.scratch), 16, generator=g)
            self.mlp[2].weight.copy_(w_out)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.mlp(hidden_states)


class WriterBlock(nn.Module):
    """Reads positions `src` (the a and b tokens) and adds u_{(a + b) mod C} at the last position."""

    def __init__(self, lay: _Layout):
        super().__init__()
        C, d = lay.C, lay.d
        self.pair = nn.Linear(2 * d, C * C)
        self.write = nn.Linear(C * C, d, bias=False)
        with torch.no_grad():
            w = torch.zeros(C * C, 2 * d)
            out = torch.zeros(d, C * C)
            for a, b in itertools.product(range(C), range(C)):
                j = a * C + b
                w[j, lay.emb[lay.a(a)]] = 1.0
                w[j, d + lay.emb[lay.b(b)]] = 1.0
                out[lay.u[(a + b) % C], j] = 1.0
            self.pair.weight.copy_(w)
            self.pair.bias.fill_(-1.0)
            self.write.weight.copy_(out)

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states
        both = torch.cat([h[:, 0], h[:, 1]], -1)
        add = self.write(torch.relu(self.pair(both)))
        return torch.cat([h[:, :-1], (h[:, -1] + add)[:, None]], 1)


class ReaderBlock(nn.Module):
    """At the last position, reads V (u dims) and q (its token dims) and adds o_{(V + q) mod C}."""

    def __init__(self, lay: _Layout):
        super().__init__()
        C, d = lay.C, lay.d
        self.mlp = nn.Sequential(nn.Linear(d, C * C), nn.ReLU(), nn.Linear(C * C, d, bias=False))
        with torch.no_grad():
            w = torch.zeros(C * C, d)
            out = torch.zeros(d, C * C)
            for v, q in itertools.product(range(C), range(C)):
                j = v * C + q
                w[j, lay.u[v]] = 1.0
                w[j, lay.emb[lay.q(q)]] = 1.0
                out[lay.o[(v + q) % C], j] = 1.0
            self.mlp[0].weight.copy_(w)
            self.mlp[0].bias.fill_(-1.0)
            self.mlp[2].weight.copy_(out)

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states
        return torch.cat([h[:, :-1], (h[:, -1] + self.mlp(h[:, -1]))[:, None]], 1)


class ToyLM(nn.Module):
    """The constructed model; attaches through interp's HF-LM adapter (model.layers, lm_head)."""

    def __init__(self, C: int = 3, n_layers: int = 5, write_layer: int = 2, n_fill: int = 3, scratch: int = 6,
                 seed: int = 0):
        super().__init__()
        if not 0 <= write_layer < n_layers - 1:
            raise ValueError(f"write_layer must leave room for the reader block: 0 <= write_layer < {n_layers - 1}")
        self.lay = lay = _Layout(C, n_fill, scratch)
        self.C, self.write_layer, self.n_fill = C, write_layer, n_fill
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(lay.vocab, lay.d)
        with torch.no_grad():
            e = torch.zeros(lay.vocab, lay.d)
            e[torch.arange(lay.vocab), torch.tensor(lay.emb)] = 1.0
            self.model.embed_tokens.weight.copy_(e)
        blocks = []
        for i in range(n_layers):
            if i == write_layer:
                blocks.append(WriterBlock(lay))
            elif i == write_layer + 1:
                blocks.append(ReaderBlock(lay))
            else:
                blocks.append(ScratchBlock(lay, seed * 100 + i))
        self.model.layers = nn.ModuleList(blocks)
        self.lm_head = nn.Linear(lay.d, lay.vocab, bias=False)
        with torch.no_grad():
            w = torch.zeros(lay.vocab, lay.d)
            for c in range(C):
                w[c, lay.o[c]] = 10.0
            self.lm_head.weight.copy_(w)
        self.eval()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        h = self.model.embed_tokens(input_ids)
        for blk in self.model.layers:
            h = blk(h)
        return ToyOutput(self.lm_head(h))

    # -- the task ------------------------------------------------------------------------------
    def dataset(self) -> tuple[torch.Tensor, dict[str, list]]:
        """Every input [a, b, filler, q] with its labels: V, y, the (a, b) pair and q."""
        rows, lab = [], {"V": [], "y": [], "pair": [], "q": [], "a": []}
        C, lay = self.C, self.lay
        for a, b, f, q in itertools.product(range(C), range(C), range(self.n_fill), range(C)):
            rows.append([lay.a(a), lay.b(b), lay.fill(f), lay.q(q)])
            v = (a + b) % C
            lab["V"].append(v)
            lab["y"].append((v + q) % C)
            lab["pair"].append(f"{a},{b}")
            lab["q"].append(q)
            lab["a"].append(a)
        return torch.tensor(rows), lab

    def counterfactual_pairs(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base, source, target): the answer after setting V of base to V of source, (V_s + q_b) mod C."""
        X, lab = self.dataset()
        g = torch.Generator().manual_seed(seed)
        bi = torch.randint(0, len(X), (n,), generator=g)
        si = torch.randint(0, len(X), (n,), generator=g)
        V, q = torch.tensor(lab["V"]), torch.tensor(lab["q"])
        return X[bi], X[si], (V[si] + q[bi]) % self.C


__all__ = ["ToyLM"]
