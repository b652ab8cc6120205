"""Probes: where a concept is linearly readable (probe maps), and whether that reading is causal (DAS / IIA).

    from probes import collect, probe_map, SubjectOf
    ds = collect(lm, prompts, "blocks.*.resid_post", labels={"country": countries},
                 positions={"subject_last": SubjectOf("last"), "last": -1}, subjects=landmarks)
    acc = probe_map(ds, "country", types="landmark", groups="landmark")   # Result (measure, layer, pos)
    rep = das(lm, "blocks.12.resid_post", -1, base, source, targets, k=1, candidates=ids)  # IIA + random-init baseline
    text, den = diffusion_probe_maps(pipe, captions, {"colour": colours}, "colour", subjects=colours)  # pipelines
"""
from .baseline import random_copy
from .das import Alignment, base_agreement, das, fit_das, iia, iia_map
from .datasets import ActivationDataset, SubjectOf, collect
from .directions import Direction, from_dataset, lda, mean_difference, probe_direction
from .linear import Probe, control_labels, evaluate, fit
from .maps import diffusion_probe_maps, lm_probe_maps, peak, plot_maps, probe_map

__all__ = ["ActivationDataset", "SubjectOf", "collect", "Probe", "fit", "evaluate", "control_labels",
           "probe_map", "lm_probe_maps", "diffusion_probe_maps", "plot_maps", "peak", "Direction", "mean_difference",
           "lda", "probe_direction", "from_dataset", "Alignment", "fit_das", "iia", "base_agreement", "das", "iia_map",
           "random_copy"]
