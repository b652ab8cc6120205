"""Metrics over model outputs. Each takes logits [batch, pos, vocab] and returns one value per item."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import InterpError


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1] if logits.dim() == 3 else logits


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least float32: 16-bit logits are widened, float64 logits keep their precision."""
    return t if t.dtype == torch.float64 else t.float()


class ColumnMetric:
    """A metric that reads only a few vocabulary columns of the last position's logits.

    Called on full logits ([batch, pos, vocab] or [batch, vocab]) it behaves like any metric.
    `columns` tells `run_grid` that only those columns of the unembedding are needed, so the
    head of a sweep computes `len(columns)` logits per row instead of the whole vocabulary;
    `on_columns` takes those logits as [batch, len(columns)] in the order of `columns`.
    """

    def __init__(self, columns: Sequence[int], fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        self.columns = tuple(int(c) for c in columns)
        self.fn, self.name = fn, name

    def on_columns(self, sub: torch.Tensor) -> torch.Tensor:
        return self.fn(_up(_last(sub)))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(_up(_last(logits)[:, list(self.columns)]))

    def __repr__(self) -> str:
        return f"{self.name}(columns={self.columns})"


def logit_diff(target: int, foil: int) -> ColumnMetric:
    """logit[target] - logit[foil] at the last position."""
    return ColumnMetric((target, foil), lambda sub: sub[:, 0] - sub[:, 1], "logit_diff")


def logit(target: int) -> ColumnMetric:
    """The raw logit of `target` at the last position."""
    return ColumnMetric((target,), lambda sub: sub[:, 0], "logit")


def prob(target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Softmax probability of `target` at the last position."""
    def f(logits):
        return _up(_last(logits)).softmax(-1)[:, target]
    return f


def logprob(target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(logits):
        return _up(_last(logits)).log_softmax(-1)[:, target]
    return f


def kl_to(reference_logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """KL(reference || run) of the last-position distributions; reference is [vocab] or [1, vocab]."""
    ref = _up(_last(reference_logits.reshape(-1, reference_logits.shape[-1])[None] if reference_logits.dim() == 1
                    else reference_logits)).log_softmax(-1)

    def f(logits):
        lp = _up(_last(logits)).log_softmax(-1)
        return (ref.exp() * (ref.to(lp.dtype) - lp)).sum(-1)
    return f


def normalized(value: torch.Tensor, clean: torch.Tensor | float, corrupted: torch.Tensor | float) -> torch.Tensor:
    """(m - m_corrupted) / (m_clean - m_corrupted): 0 = corrupted behaviour, 1 = clean behaviour."""
    denom = torch.as_tensor(clean) - torch.as_tensor(corrupted)
    if torch.as_tensor(denom).abs().max() < 1e-12:
        raise ValueError("clean and corrupted metrics are equal, so the normalised effect is undefined: "
                         "choose prompts whose metric differs")
    return (value - corrupted) / denom


def denoiser_distance(reference: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Relative L2 distance of a denoiser output to a reference output, per item."""
    def f(out):
        ref = reference.to(out.dtype).expand_as(out) if reference.shape[0] == 1 else reference
        num = (out - ref).flatten(1).norm(dim=1)
        return num / ref.flatten(1).norm(dim=1).clamp_min(1e-12)
    return f


def token_id(tokenizer, word: str) -> int:
    """The single token id of `word` (e.g. ' Paris'); errors if it takes several tokens."""
    if tokenizer is None:
        raise InterpError(f"cannot turn {word!r} into a token id: this model was attached without a tokenizer; "
                          "use interp.attach(model, tokenizer=...) or pass the token id as an int")
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens ({ids}); metrics need a single-token target: "
                         "try it with or without a leading space")
    return ids[0]
