"""What every adapter provides to the engine."""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InterpError
from ..sites import SiteTable


class PromptLengthError(InterpError, ValueError):
    """Prompts in one batch tokenize to different lengths."""


@dataclass
class Prepared:
    """Model inputs for one base batch, plus what the engine needs to resolve `where`."""

    kwargs: dict[str, Any]
    batch: int
    seq_len: int | None
    tokens: list[list[str]] = field(default_factory=list)  # token strings per item
    args: tuple = ()

    def repeat(self, n: int) -> Prepared:
        """The same batch repeated n times along the batch axis (row-major: all items of row 0 first)."""
        if n == 1:
            return self
        def rep(v):
            batched = isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.batch
            return v.repeat(n, *([1] * (v.dim() - 1))) if batched else v
        return Prepared({k: rep(v) for k, v in self.kwargs.items()}, self.batch * n, self.seq_len,
                        self.tokens * n, tuple(rep(a) for a in self.args))


def module_paths(root: nn.Module) -> list[str]:
    return [n for n, _ in root.named_modules() if n]


def first_attr(obj: nn.Module, names, default=None):
    for n in names:
        if n and has_submodule(obj, n):
            return n
    return default


def has_submodule(obj: nn.Module, path: str) -> bool:
    """Whether `obj` has a submodule at the dotted `path`."""
    try:
        obj.get_submodule(path)
        return True
    except (AttributeError, ValueError):
        return False


class Adapter(abc.ABC):
    """Base adapter. Subclasses fill `sites`, `prepare` and `forward`.

    Prefix reuse: an adapter that sets `block_paths` and implements `tail(hidden, last_only)` lets the
    engine start rows from a cached block input; the engine checks the replay against a real forward
    once and falls back to full forwards if they disagree.
    """

    family = "generic"
    block_paths: list[str] = []

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model
        self.root: nn.Module = model
        self.tokenizer = tokenizer

    # -- sites ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def site_table(self) -> SiteTable:
        """Every site of this model, in forward order."""

    # -- inputs --------------------------------------------------------------------------------
    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        if isinstance(inputs, torch.Tensor):
            return Prepared({}, inputs.shape[0], inputs.shape[1] if inputs.dim() > 1 else None, [], (inputs,))
        if isinstance(inputs, dict):
            first = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
            return Prepared(dict(inputs), first.shape[0], first.shape[1] if first.dim() > 1 else None)
        if isinstance(inputs, tuple):
            first = inputs[0]
            return Prepared({}, first.shape[0], first.shape[1] if first.dim() > 1 else None, [], inputs)
        raise TypeError(f"{type(self).__name__} cannot take inputs of type {type(inputs).__name__}; "
                        "pass a tensor, a tuple of tensors or a dict of keyword tensors")

    def forward(self, prepared: Prepared, last_only: bool = False):
        return self.root(*prepared.args, **prepared.kwargs)

    def main_output(self, output) -> torch.Tensor:
        """The tensor metrics look at (logits for LMs)."""
        if isinstance(output, torch.Tensor):
            return output
        for key in ("logits", "last_hidden_state", "sample"):
            v = getattr(output, key, None)
            if isinstance(v, torch.Tensor):
                return v
        if isinstance(output, (tuple, list)) and isinstance(output[0], torch.Tensor):
            return output[0]
        raise TypeError(f"cannot find the main output tensor in a {type(output).__name__}")

    # -- prefix replay (optional) ---------------------------------------------------------------
    tail: Callable | None = None

    def describe(self) -> str:
        return f"{self.family} ({type(self.model).__name__})"


def tokenize(tokenizer, inputs, pad: bool) -> tuple[dict, list[list[str]]]:
    """Strings -> (input_ids, attention_mask) with token strings; equal lengths unless pad."""
    if tokenizer is None:
        raise InterpError("this model has no tokenizer, so string inputs cannot be used: pass "
                          "attach(model, tokenizer=...) or token ids as a tensor")
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    encs = [tokenizer(t, return_tensors="pt")["input_ids"][0] for t in texts]
    lengths = [len(e) for e in encs]
    if len(set(lengths)) > 1 and not pad:
        detail = ", ".join(f"{t!r}: {n}" for t, n in zip(texts, lengths))
        raise PromptLengthError(
            f"prompts have different token lengths ({detail}). Patching and batched runs compare "
            "positions one to one: rephrase the prompts to the same number of tokens, or pass pad=True "
            "for a plain run (positions then refer to the padded sequence).")
    if len(set(lengths)) > 1:
        T = max(lengths)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), T), dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = 1
    else:
        ids = torch.stack(encs)
        mask = torch.ones_like(ids)
    tokens = [[tokenizer.decode([int(i)]) for i in row] for row in ids]
    return {"input_ids": ids, "attention_mask": mask}, tokens


def ids_tokens(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    if tokenizer is None:
        return [[str(int(i)) for i in row] for row in ids]
    return [[tokenizer.decode([int(i)]) for i in row] for row in ids]


LM_KEYS = ("input_ids", "attention_mask", "inputs_embeds", "position_ids")


def prepare_token_inputs(model, tokenizer, inputs: Any, pad: bool, keys=LM_KEYS, with_mask: bool = False) -> Prepared:
    """Prompts, a [batch, pos] id tensor or a tokenizer dict -> Prepared on the model's input device."""
    from ..sharding import input_device

    dev = input_device(model)  # accelerate-dispatched models: the execution device, not meta
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        kw, tokens = tokenize(tokenizer, inputs, pad)
    elif isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs[None]
        kw, tokens = {"input_ids": ids}, ids_tokens(tokenizer, ids)
        if with_mask:
            kw["attention_mask"] = torch.ones_like(ids)
    elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
        kw = {k: v for k, v in dict(inputs).items() if k in keys}
        given = kw.get("input_ids")
        tokens = ids_tokens(tokenizer, given) if given is not None else []
    else:
        raise TypeError(f"cannot run {type(model).__name__} on a {type(inputs).__name__}: pass a prompt, a list "
                        "of prompts, a [batch, pos] tensor of token ids or a dict from the tokenizer")
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    first = kw.get("input_ids", kw.get("inputs_embeds"))
    if first is None:
        raise TypeError(f"cannot run {type(model).__name__}: the inputs hold neither input_ids nor inputs_embeds")
    return Prepared(kw, first.shape[0], first.shape[1], tokens)
