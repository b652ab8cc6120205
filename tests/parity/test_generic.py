"""The generic adapter on a module built to hit every awkward case: clear errors, every tuple slot, no containers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import interp
from interp.errors import SiteShapeError, UnknownSiteError


class Pair(nn.Module):
    def forward(self, x):
        return x * 2, x + 1


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.total = nn.Identity()
        self.pair = Pair()
        self.time = nn.Identity()

    def forward(self, x):
        a = self.lin(x)
        b = self.lin(x[:, :2])           # the same module again, with another shape
        g = self.total(x.sum())          # no batch axis
        p, q = self.pair(x)
        t = self.time(x.reshape(1, -1))   # one row for the whole batch: axis 0 is not the batch
        return self.blocks[1](self.blocks[0](a)) + g + q + b.sum() + p.mean() + t.reshape(x.shape)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return interp.attach(Toy().eval())


def test_containers_are_not_sites_and_say_which_child_to_use(toy):
    names = toy.site_names()
    assert "module:blocks" not in names and "module:blocks.0" in names
    with pytest.raises(UnknownSiteError, match=r"ModuleList.*never runs.*module:blocks\.0"):
        toy.run(torch.randn(3, 5, 4), [interp.Ablate("module:blocks")])


def test_module_called_twice_with_two_shapes_is_a_clear_error(toy):
    with pytest.raises(SiteShapeError, match=r"ran 2 times in one forward with different shapes"):
        toy.capture(torch.randn(3, 5, 4), "module:lin")


@pytest.mark.parametrize("site", ["module:total", "module:time"])
def test_sites_without_a_batch_axis_are_clear_errors(toy, site):
    with pytest.raises(SiteShapeError, match=r"no batch axis"):
        toy.run(torch.randn(3, 5, 4), [interp.Ablate(site)])


def test_every_tuple_slot_is_a_site(toy):
    x = torch.randn(3, 5, 4)
    c = toy.capture(x, ["module:pair", "module:pair:output.0", "module:pair:output.1"])
    torch.testing.assert_close(c["module:pair"], x * 2)
    torch.testing.assert_close(c["module:pair:output.0"], x * 2)
    torch.testing.assert_close(c["module:pair:output.1"], x + 1)
    # an edit of slot 1 reaches the output exactly as much as that slot does (output = ... + q)
    base = toy.run(x).logits
    zero = toy.run(x, [interp.Ablate("module:pair:output.1")]).logits
    torch.testing.assert_close(base - zero, x + 1)
