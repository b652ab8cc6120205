"""A hand-built network whose causal graph is known: patching every site finds exactly the planted one.

Input: [batch, 4 positions, 3 features]. Feature 0 of position 2 carries the bit that differs between
the clean and corrupted inputs. Three parallel branches read each position; only branch `x` reads
feature 0, and only its output at position 2 reaches the readout (through a fixed position mix).
"""
import torch
from torch import nn

import interp
from interp import Patch, at


class Planted(nn.Module):
    def __init__(self):
        super().__init__()
        self.x, self.y, self.z = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)
        self.readout = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.x.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))   # reads the bit
            self.y.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))   # blind to it
            self.z.weight.copy_(torch.tensor([[0.0, 0.5, 0.5], [0.0, -1.0, 0.0]]))  # blind to it
            self.readout.weight.copy_(torch.tensor([[2.0, 0.5]]))

    def forward(self, inp):
        h = torch.tanh(self.x(inp)) + torch.tanh(self.y(inp)) + torch.tanh(self.z(inp))
        mixed = h.mean(1)  # every position reaches the output
        return self.readout(mixed)[:, 0]


def test_patching_every_site_finds_exactly_the_planted_site():
    torch.manual_seed(0)
    model = Planted().eval()
    clean = torch.rand(1, 4, 3)
    corrupt = clean.clone()
    corrupt[0, 2, 0] = -1.0  # only the bit at position 2 differs
    clean[0, 2, 0] = 1.0
    lm = interp.attach(model)
    sites = ["module:x", "module:y", "module:z"]
    source = lm.run(clean, capture=sites)
    rows, labels = [], []
    for s in sites:
        for p in range(4):
            rows.append([Patch(s, source.cache[s], where=at(pos=p))])
            labels.append((s, p))
    g = lm.run_grid(corrupt, rows, metric=lambda out: out, progress=False)
    effect = (g.values[:, 0] - g.base[0]) / (source.logits[0] - g.base[0])
    found = {labels[i] for i in range(len(rows)) if effect[i].abs() > 1e-6}
    assert found == {("module:x", 2)}
    assert abs(float(effect[labels.index(("module:x", 2))]) - 1.0) < 1e-6
