"""Engine-level bad input: each kind is refused with one InterpError naming what was wrong (issue 16)."""
from __future__ import annotations

import math

import pytest
import torch

import interp
from interp import Ablate, Add, Noise, Patch, Project, Replace, Subject, Tokens, at
from interp.errors import InterpError, PositionError, SiteShapeError, SpecError

PROMPT = "The cat sat on the mat"


@pytest.fixture
def lm(gpt2):
    return interp.attach(gpt2)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("pos, words", [
    ("10", "only string position"), ("last", "only string position"), (2.7, "not an integer"),
    (torch.tensor([[1, 2]]), "2-D"), ([], "selects nothing"), (slice(0, 3, 0), "step cannot be zero"),
    ([1, 2.5], "not an integer"), (True, "not an integer"),
])
def test_malformed_positions_are_refused_where_the_op_is_written(pos, words):
    with pytest.raises(SpecError, match=words) as e:
        at(pos=pos)
    _one_line(e)


@pytest.mark.parametrize("pos", [slice(50, 60), slice(4, 2)])
def test_a_slice_that_selects_nothing_is_an_error_not_a_silent_no_op(lm, pos):
    with pytest.raises(PositionError, match="selects no position") as e:
        lm.run(PROMPT, [Add("blocks.0.resid_pre", torch.ones(64), where=at(pos=pos))])
    _one_line(e)
    assert interp.hook_count(lm.model) == 0


def test_a_position_string_is_never_iterated(lm):
    """at(pos='10') used to edit positions 1 and 0 (the characters of the string)."""
    with pytest.raises(SpecError):
        lm.run(PROMPT, [Add("blocks.0.resid_pre", torch.ones(64), where=at(pos="10"))])


@pytest.mark.parametrize("make, words", [
    (lambda: Noise("embed", std=-1.0), "standard deviation"),
    (lambda: Noise("embed", std=math.nan), "not finite"),
    (lambda: Add("embed", torch.ones(64), alpha=math.nan), "not finite"),
    (lambda: Add("embed", torch.ones(64), alpha=math.inf), "not finite"),
    (lambda: Add("embed", torch.tensor([1.0, math.nan] * 32)), "NaN or inf"),
    (lambda: Patch("embed", torch.full((6, 64), math.inf)), "NaN or inf"),
    (lambda: Patch("embed", torch.zeros(6, 64), alpha=math.nan), "not finite"),
    (lambda: Patch("embed", torch.zeros(6, 64, device="meta")), "meta device"),
    (lambda: Patch("embed", None), "must be a tensor"),
    (lambda: Add("embed", None), "must be a tensor"),
    (lambda: Add("embed", torch.zeros(64), norm="relative"), "vector is zero"),
    (lambda: Replace("embed", 3), "callable"),
    (lambda: Project("embed", {"L": torch.zeros(4, 2)}), "eraser must have L and R"),
    (lambda: Ablate("embed", mode="mean"), "needs values="),
    (lambda: Tokens(" cat", occurrence=1.5), "not an integer"),
    (lambda: Subject("cat", which="middle"), "which must be"),
    (lambda: Subject(""), "non-empty"),
    (lambda: at(steps=-2), "count from 0"),
    (lambda: at(steps=(5, 2)), "0 <= start < stop"),
    (lambda: at(heads=[-1]), "count from 0"),
    (lambda: at(branch="left"), "branch must be"),
    (lambda: Add("", torch.ones(64)), "site must be"),
])
def test_out_of_domain_op_fields_are_refused_at_construction(make, words):
    with pytest.raises(SpecError, match=words) as e:
        make()
    _one_line(e)


def test_required_fields_have_no_defaults():
    """Patch(site) used to be accepted and fail later inside the hook."""
    for make in (lambda: Patch("embed"), lambda: Add("embed"), lambda: Replace("embed"), lambda: Project("embed")):
        with pytest.raises(TypeError, match="missing 1 required positional argument"):
            make()


def test_tokens_and_subject_occurrences_out_of_range_name_the_matches(lm):
    with pytest.raises(PositionError, match=r"occurrence=5\): the prompt has 1 occurrence") as e:
        lm.run(PROMPT, [Add("blocks.0.resid_pre", torch.ones(64), where=at(pos=Tokens(" cat", occurrence=5)))])
    _one_line(e)
    with pytest.raises(PositionError, match=r"occurs 3 time"):
        lm.run(PROMPT, [Add("blocks.0.resid_pre", torch.ones(64), where=at(pos=Subject("at", occurrence=3)))])


def test_subject_occurrence_defaults_to_the_first_as_in_rome(lm):
    prompt = "The cat sat on the cat"
    first = lm.positions(prompt, Subject(" cat"))
    last = lm.positions(prompt, Subject(" cat", occurrence=-1))
    assert first == [1] and last == [5]


def test_a_patch_source_of_the_wrong_batch_is_refused(lm):
    """A source of batch 2 on 3 inputs used to give item 2 the activations of item 0."""
    src = torch.zeros(2, 6, 64)
    with pytest.raises(SiteShapeError, match="batch 2, the input has 3 item") as e:
        lm.run([PROMPT] * 3, [Patch("blocks.0.resid_pre", src)])
    _one_line(e)


def test_an_empty_prompt_and_out_of_vocabulary_ids_are_clear_errors(lm):
    with pytest.raises(InterpError, match="empty") as e:
        lm.run("")
    _one_line(e)
    with pytest.raises(InterpError, match="vocabulary") as e:
        lm.run(torch.tensor([[1, 2, 50257]]))
    _one_line(e)
    with pytest.raises(InterpError, match="context") as e:
        lm.run(torch.ones(1, 65, dtype=torch.long))
    _one_line(e)


def test_grid_arguments_are_checked(lm):
    row = [Add("blocks.0.resid_pre", torch.ones(64), where=at(pos=1))]
    with pytest.raises(SpecError, match="rows, each a list of ops"):
        lm.run_grid(PROMPT, row, progress=False)  # a flat list of ops
    with pytest.raises(SpecError, match="chunk_rows"):
        lm.run_grid(PROMPT, [row], chunk_rows=-1, progress=False)
    with pytest.raises(SpecError, match="one value per item"):
        lm.run_grid([PROMPT, PROMPT], [row], lambda lg: lg[:, -1, 0].mean(), progress=False)  # batch-reduced
    with pytest.raises(SpecError, match="one value per item"):
        lm.run_grid(PROMPT, [row], lambda lg: 3.0, progress=False)  # not a tensor


def test_a_metric_with_non_finite_values_names_the_row(lm):
    rows = [[Add("blocks.0.resid_pre", torch.ones(64), where=at(pos=p))] for p in (1, 2, 3)]

    def metric(logits):  # finite on the base run, NaN once position 2 is edited... by row index below
        out = logits[:, -1, :3].clone()
        if logits.shape[0] == 1 and metric.calls == 2:
            out[0, 0] = math.nan
        metric.calls += 1
        return out
    metric.calls = 0
    with pytest.raises(InterpError, match=r"NaN or inf values for row 1 ") as e:
        lm.run_grid(PROMPT, rows, metric, chunk_rows=1, reuse_prefix=False, progress=False)
    _one_line(e)
    assert interp.hook_count(lm.model) == 0


def test_add_on_a_feature_map_without_spatial_is_an_error():
    """On a conv map axis 1 holds channels: Add without spatial= would add along the wrong axis."""
    from interp.sites import Site

    site = Site("unet.mid", "mid", axes=("batch", "channel", "height", "width"))
    from interp.engine import _check_axes

    with pytest.raises(SiteShapeError, match="spatial='average'"):
        _check_axes(Add("unet.mid", torch.ones(8)), site)
    _check_axes(Add("unet.mid", torch.ones(8), spatial="average"), site)  # accepted


@pytest.mark.parametrize("kw", [dict(steps=-2), dict(steps=0), dict(steps=2.5), dict(guidance=math.nan),
                                dict(prompt=[])])
def test_malformed_sampling_requests_are_refused(kw):
    """Sampling(steps=-2) used to return an undenoised image, steps=0 a ZeroDivisionError."""
    from interp.diffusion import Sampling

    with pytest.raises(SpecError) as e:
        Sampling(**{"prompt": "a red circle", **kw})
    _one_line(e)
