"""What every erasure method shares: aligned concept prompts, keys captured through the engine, and
`Edit` — the new weights of the edited layers, applied to a model in place or written to a checkpoint.
The methods' formulas and settings: docs/METHODS.md, "Closed-form weight edits", "LEACE", "HiRM"."""
from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import interp
from interp.collect import collect


@dataclass(frozen=True)
class Concept:
    """Prompts for one concept: each source prompt names it; its guides say the same with the concept
    replaced (their states are averaged); preserve prompts must keep their behaviour.

    Built with `Concept.from_prompts`. `word` is the concept as written in the prompts.
    """

    word: str
    sources: tuple[str, ...]
    guides: tuple[tuple[str, ...], ...]
    preserve: tuple[str, ...] = ()
    guide_words: tuple[str, ...] = ()

    @classmethod
    def from_prompts(cls, word: str, prompts: Sequence[str], guide_words: Sequence[str],
                     preserve: Sequence[str] = ()) -> Concept:
        """Source prompts = those of `prompts` containing `word` (as a whole word); guides replace it by
        each of `guide_words`; `preserve` (default: the prompts without the word) are kept."""
        if not guide_words:
            raise ValueError(f"erasing {word!r} needs at least one guide word to map it to (e.g. a super-category "
                             "or sibling concepts)")
        pat = re.compile(rf"\b{re.escape(word)}\b")
        sources = tuple(p for p in prompts if pat.search(p))
        if not sources:
            raise ValueError(f"none of the {len(prompts)} prompts contains the concept {word!r}; "
                             f"first prompts: {list(prompts)[:3]}")
        guides = tuple(tuple(pat.sub(lambda _m, g=g: g, p) for g in guide_words) for p in sources)
        keep = tuple(preserve) if preserve else tuple(p for p in prompts if not pat.search(p))
        return cls(word, sources, guides, keep, tuple(guide_words))

    def describe(self) -> dict:
        return {"concept": self.word, "n_sources": len(self.sources), "guide_words": list(self.guide_words),
                "n_preserve": len(self.preserve), "example": self.sources[0], "example_guide": self.guides[0][0]}


def tokenize_like_pipeline(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, as diffusers' encode_prompt does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def edit_start(tokenizer, source: str, guides: Sequence[str]) -> int:
    """First token position where the source and its guides differ; they must tokenize to equal lengths."""
    ids = [tokenizer(p)["input_ids"] for p in (source, *guides)]
    if len({len(i) for i in ids}) != 1:
        lens = {p: len(i) for p, i in zip((source, *guides), ids)}
        raise ValueError(f"source and guide prompts must have the same number of tokens so that positions align "
                         f"({lens}); choose guide words of the concept's token length")
    diff = [t for t in range(len(ids[0])) if any(i[t] != ids[0][t] for i in ids[1:])]
    if not diff:
        raise ValueError(f"the guides of {source!r} are identical to it: the guide words must differ from the concept")
    return diff[0]


def capture(component: nn.Module, inputs: Any, sites: Sequence[str], chunk: int = 64,
            batch_keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Run `component` through the interp engine on batched inputs and return the captured sites (float64).

    inputs: a tensor [N, ...] or a dict of tensors with batch first (only `batch_keys` are split, default:
    every tensor whose first axis has N entries); run in chunks of `chunk` items.
    """
    lm = interp.attach(component)
    return collect(lm, inputs, list(sites), None, batch_size=chunk, dtype=torch.float64, device=None, once=True,
                   split_keys=batch_keys)


def linear_modules(root: nn.Module, pattern: str) -> list[str]:
    """Paths of the nn.Linear modules whose path matches the regular expression `pattern`, in module order."""
    return [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and re.search(pattern, n)]


@dataclass
class Edit:
    """New values for some parameters of a model (keys: dotted names from the pipeline / model root).

    `apply(model)` writes them in place; `manifest` describes the edit (method, concept, layers, lambda).
    """

    method: str
    concept: str
    tensors: dict[str, torch.Tensor]
    lam: float | None = None
    layers: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    erasers: dict = field(default_factory=dict)  # LEACE: site -> LeaceEraser that was folded (not in the manifest)

    def manifest(self) -> dict:
        return {"method": self.method, "concept": self.concept, "lambda": self.lam, "layers": list(self.layers),
                "edited_tensors": sorted(self.tensors), **{k: v for k, v in self.info.items()}}

    def apply(self, model: Any) -> Any:
        """Write the edited tensors into `model` (a pipeline or nn.Module) in place; returns it."""
        for name, value in self.tensors.items():
            p = get_param(model, name)
            if p.shape != value.shape:
                raise ValueError(
                    f"edit of {name!r} has shape {tuple(value.shape)}, the model's tensor has {tuple(p.shape)}"
                )
            with torch.no_grad():
                p.copy_(value.to(p.dtype))
        return model

    def applied(self, model: Any) -> Any:
        """A deep copy of `model` with the edit applied (the original is untouched)."""
        return self.apply(copy.deepcopy(model))


def get_param(model: Any, name: str) -> torch.Tensor:
    """'unet.down_blocks.0.attn2.to_k.weight' on a pipeline, or 'layer.weight' on a module."""
    if isinstance(model, nn.Module):
        try:
            return model.get_parameter(name)
        except AttributeError as e:
            raise KeyError(f"the model has no parameter {name!r}") from e
    comp, _, rest = name.partition(".")
    module = getattr(model, comp, None)
    if not isinstance(module, nn.Module):
        raise KeyError(f"the pipeline has no component {comp!r} (parameter {name!r}); components: "
                       f"{[k for k, v in getattr(model, 'components', {}).items() if isinstance(v, nn.Module)]}")
    return get_param(module, rest)
