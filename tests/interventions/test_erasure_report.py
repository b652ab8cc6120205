"""The efficacy / specificity report on ground-truth renders: the scorers see exactly what was drawn, so the
acceptance logic is checked against known answers."""
import dataclasses

import numpy as np

from interp.zoo import shapes
from interventions.erasure.report import compare, eval_attributes, score_images, shapes_concept, summarize


def render_all(attrs, n=1, change=None):
    out = []
    for a in attrs:
        b = change(a) if change else a
        out += [shapes.render(b)] * n
    return np.stack(out)


def test_report_on_ground_truth_renders():
    attrs = eval_attributes(3, seed=1)
    assert len(attrs) == 18 and {a.colour for a in attrs} == set(shapes.COLOURS)
    before = summarize(score_images(render_all(attrs, 2), attrs, 2), "red")
    assert before["concept_rate"] == 1.0 and before["other_values_accuracy"] == 1.0
    assert before["accuracy_all"]["shape"] == 1.0

    # red shapes drawn cyan, nothing else changed: efficacy and specificity both met
    recolour = lambda a: dataclasses.replace(a, colour="cyan") if a.colour == "red" else a
    after = summarize(score_images(render_all(attrs, 2, recolour), attrs, 2), "red")
    cmp = compare(before, after, "red")
    assert cmp["relative_drop"] == 1.0 and cmp["efficacy_ok"] and cmp["specificity_ok"]
    assert after["predicted_on_concept_prompts"] == {"cyan": 6}

    # the same recolouring, but every circle becomes a square: shape accuracy falls, specificity fails
    both = lambda a: dataclasses.replace(recolour(a), shape="square" if a.shape == "circle" else a.shape)
    cmp2 = compare(before, summarize(score_images(render_all(attrs, 2, both), attrs, 2), "red"), "red")
    n_circles = sum(a.shape == "circle" for a in attrs)
    assert cmp2["efficacy_ok"] and not cmp2["specificity_ok"]
    assert abs(cmp2["other_attribute_accuracy_change"]["shape"] + n_circles / len(attrs)) < 1e-9

    # blue drawn green as a side effect: the other colours' accuracy falls by 1/5
    spill = lambda a: dataclasses.replace(recolour(a), colour="green") if a.colour == "blue" else recolour(a)
    cmp3 = compare(before, summarize(score_images(render_all(attrs, 2, spill), attrs, 2), "red"), "red")
    assert not cmp3["specificity_ok"] and abs(cmp3["other_values_accuracy_change"] + 0.2) < 1e-9


def test_shapes_concept_uses_siblings():
    c = shapes_concept("red")
    assert len(c.sources) == 48 and len(c.preserve) == 240
    assert set(c.guide_words) == set(shapes.COLOURS) - {"red"}
    assert shapes_concept("circle").guide_words == ("square", "triangle", "cross")
