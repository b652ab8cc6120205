"""Concept erasure in a language model's residual stream, judged on held-out data: the grammatical gender of a
first name, read at the last token of "<name> said that" style prompts (the model needs it to pick he / she).

Names are split three ways (eraser fit / probe fit / probe score), so no probe is scored on a name that an
eraser or the probe itself saw. `one_site` runs every eraser at one site; `every_layer` runs LEACE at each block.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .baselines import evaluate

MALE = ["James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas", "Charles", "Daniel",
        "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kenneth", "George", "Edward", "Brian", "Kevin",
        "Peter", "Henry", "Frank", "Jack", "Samuel", "Patrick", "Arthur", "Oliver"]
FEMALE = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
          "Nancy", "Lisa", "Betty", "Margaret", "Sandra", "Ashley", "Emily", "Donna", "Michelle", "Dorothy", "Carol",
          "Amanda", "Melissa", "Rebecca", "Laura", "Helen", "Anna", "Emma", "Olivia", "Sophia"]
TEMPLATES = ["{} said that", "Yesterday {} told me that", "When {} woke up,", "{} went to the store because",
             "After dinner, {} realised that", "{} called the office and said that", "At the party {} announced that",
             "{} finished the report and then", "Everyone agreed that {} was right, because", "{} smiled and said",
             "On Monday {} decided that", "Later that night {} wrote that", "{} looked at the sky and thought that",
             "The teacher asked {} why", "{} opened the door and", "Before leaving, {} promised that"]


def gender_data() -> tuple[list[str], torch.Tensor, list[str]]:
    """Prompts, labels (0 male, 1 female) and the name of each prompt (the split groups)."""
    prompts, z, names = [], [], []
    for label, group in ((0, MALE), (1, FEMALE)):
        for n in group:
            for t in TEMPLATES:
                prompts.append(t.format(n))
                z.append(label)
                names.append(n)
    return prompts, torch.tensor(z), names


def last_token_acts(lm, prompts: Sequence[str], sites: Sequence[str], batch: int = 32) -> dict[str, torch.Tensor]:
    """[n, d] activations at each prompt's last token for each site (one engine run per batch)."""
    from ..editing.solver import _pad_id, batch_ids

    tok = lm.tokenizer
    out = {s: [] for s in sites}
    for i in tqdm(range(0, len(prompts), batch), desc="activations"):
        seqs = [list(tok(p)["input_ids"]) for p in prompts[i:i + batch]]
        last = torch.tensor([len(s) - 1 for s in seqs])
        with torch.no_grad():
            cache = lm.run(batch_ids(seqs, _pad_id(tok)), capture=list(sites)).cache
        for s in sites:
            out[s].append(cache[s][torch.arange(len(seqs)), last].double().cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def study(lm, site: str = "blocks.15.resid_post", seed: int = 0, rlace_steps: int = 300, acts_file=None) -> dict:
    """Every eraser at `site` and LEACE at every block's resid_post, each judged by held-out probes, on two splits:
    by prompt (40/30/30% of the prompts) and by name (40/30/30% of the names: no scored name was seen in fitting)."""
    from pathlib import Path

    prompts, z, names = gender_data()
    sites = [f"blocks.{i}.resid_post" for i in range(lm.n_layers)]
    from interp.io import load_state, save_state

    if acts_file is not None and Path(acts_file).exists():
        acts = load_state(acts_file)  # safetensors + JSON: nothing is unpickled
    else:
        acts = last_token_acts(lm, prompts, sorted(set(sites) | {site}))
        if acts_file is not None:
            save_state(acts_file, acts)
    out = {"concept": "gender of a first name (0 male, 1 female)", "n_prompts": len(prompts),
           "n_names": len(set(names)), "templates": TEMPLATES, "site": site, "d": int(acts[site].shape[1])}
    for split, groups in (("by_prompt", None), ("by_name", names)):
        out[split] = {"one_site": evaluate(acts[site], z, seed=seed, groups=groups, rlace_steps=rlace_steps),
                      "every_layer": {s: evaluate(acts[s], z, methods=("none", "leace"), seed=seed, groups=groups)
                                      for s in tqdm(sites, desc=f"layers ({split})")}}
    return out
