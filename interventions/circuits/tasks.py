"""Templated prompt-pair tasks built in code: IOI-style names, greater-than years, subject-verb
agreement and capital-country facts.

A task is clean prompts, corrupted prompts of the same token length, and per pair an answer and a foil
token; its metric is the mean-free logit difference logit[answer] - logit[foil] at the last position.
`check(tokenizer)` tokenises everything and raises TaskTokenError naming the first offending pair.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from interp.errors import InterpError
from interp.metrics import ColumnMetric


class TaskTokenError(InterpError, ValueError):
    """A task's prompts or answers do not tokenise as the task needs."""


@dataclass
class Task:
    name: str
    clean: list[str]
    corrupted: list[str]
    answers: list[str]
    foils: list[str]
    ids: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clean)

    def check(self, tokenizer) -> Task:
        """Equal token lengths within and across pairs, single-token answers and foils; fills `ids`."""
        enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
        lens = set()
        for i, (c, x) in enumerate(zip(self.clean, self.corrupted)):
            lc, lx = len(enc(c)), len(enc(x))
            if lc != lx:
                raise TaskTokenError(f"{self.name} pair {i}: clean {c!r} is {lc} tokens, corrupted {x!r} is {lx}; "
                                     "pairs must align position by position: pick words of equal token length")
            lens.add(lc)
        if len(lens) > 1:
            raise TaskTokenError(f"{self.name}: prompts have token lengths {sorted(lens)}; one batch needs one "
                                 "length: build the task from words of the same token length")
        ans: list[int] = []
        foil: list[int] = []
        for i, (a, f) in enumerate(zip(self.answers, self.foils)):
            for w, out in ((a, ans), (f, foil)):
                t = enc(w)
                if len(t) != 1:
                    raise TaskTokenError(f"{self.name} pair {i}: answer/foil {w!r} is {len(t)} tokens {t}; the "
                                         "metric needs single-token answers (try it with a leading space)")
                out.append(t[0])
        self.ids = {"answer": ans, "foil": foil}
        return self

    def metric(self) -> ColumnMetric:
        """logit[answer_i] - logit[foil_i] for item i (rows of a grid repeat the items in order)."""
        if not self.ids:
            raise TaskTokenError(f"call {self.name}.check(tokenizer) before .metric()")
        cols = sorted(set(self.ids["answer"]) | set(self.ids["foil"]))
        a = torch.tensor([cols.index(t) for t in self.ids["answer"]])
        f = torch.tensor([cols.index(t) for t in self.ids["foil"]])
        n = len(a)

        def fn(sub: torch.Tensor) -> torch.Tensor:
            i = torch.arange(sub.shape[0], device=sub.device) % n
            return sub.gather(1, a.to(sub.device)[i, None])[:, 0] - sub.gather(1, f.to(sub.device)[i, None])[:, 0]
        return ColumnMetric(cols, fn, f"logit_diff({self.name})")


NAMES = ["Mary", "John", "Tom", "James", "Paul", "Mark", "Sarah", "Anna", "David", "Kate", "Peter", "Lucy"]
PLACES = ["store", "park", "school", "garden", "office", "station"]
OBJECTS = ["drink", "book", "ball", "letter", "key", "gift"]


def ioi(n: int = 8, seed: int = 0, names=NAMES) -> Task:
    """"When A and B went to the P, B gave a O to" -> " A" (foil " B"); corrupted: a third name C in
    place of the repeated B, so the indirect object is no longer identified."""
    rng = random.Random(seed)
    clean, corr, ans, foil = [], [], [], []
    for _ in range(n):
        a, b, c = rng.sample(names, 3)
        p, o = rng.choice(PLACES), rng.choice(OBJECTS)
        t = "When {} and {} went to the {}, {} gave a {} to"
        clean.append(t.format(a, b, p, b, o))
        corr.append(t.format(a, b, p, c, o))
        ans.append(" " + a)
        foil.append(" " + b)
    return Task("ioi", clean, corr, ans, foil)


def greater_than(n: int = 8, seed: int = 0, century: int = 17) -> Task:
    """"The war lasted from the year 17YY to the year 17" -> "YY+1" (foil "YY-1", two-digit tokens as
    GPT-2 splits years); corrupted: the start year 1701. Tokenizers that split digits fail `check`."""
    rng = random.Random(seed)
    clean, corr, ans, foil = [], [], [], []
    for _ in range(n):
        yy = rng.randint(12, 87)
        t = "The war lasted from the year {}{:02d} to the year {}"
        clean.append(t.format(century, yy, century))
        corr.append(t.format(century, 1, century))
        ans.append(f"{yy + 1:02d}")
        foil.append(f"{yy - 1:02d}")
    return Task("greater_than", clean, corr, ans, foil)


SINGULAR = [("key", "keys"), ("dog", "dogs"), ("author", "authors"), ("pilot", "pilots"), ("farmer", "farmers")]
ATTRACTORS = [("cabinet", "cabinets"), ("house", "houses"), ("table", "tables")]


def agreement(n: int = 8, seed: int = 0) -> Task:
    """"The key near the cabinets" -> " is" (foil " are"); corrupted: the plural subject ("The keys near
    the cabinets"), whose verb is " are"."""
    rng = random.Random(seed)
    clean, corr, ans, foil = [], [], [], []
    for _ in range(n):
        (s, sp), (a, ap) = rng.choice(SINGULAR), rng.choice(ATTRACTORS)
        att = rng.choice([a, ap])
        clean.append(f"The {s} near the {att}")
        corr.append(f"The {sp} near the {att}")
        ans.append(" is")
        foil.append(" are")
    return Task("agreement", clean, corr, ans, foil)


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("England", "London"),
            ("Canada", "Ottawa")]


def capitals(n: int = 8, seed: int = 0, pairs=CAPITALS) -> Task:
    """"The capital of France is the city of" -> " Paris" (foil: the corrupted country's capital);
    corrupted: another country."""
    rng = random.Random(seed)
    clean, corr, ans, foil = [], [], [], []
    for _ in range(n):
        (c1, a1), (c2, a2) = rng.sample(pairs, 2)
        t = "The capital of {} is the city of"
        clean.append(t.format(c1))
        corr.append(t.format(c2))
        ans.append(" " + a1)
        foil.append(" " + a2)
    return Task("capitals", clean, corr, ans, foil)


TASKS = {"ioi": ioi, "greater_than": greater_than, "agreement": agreement, "capitals": capitals}


def fitting(task: Task, tokenizer, n: int | None = None) -> Task:
    """The pairs of `task` that pass `check` on this tokenizer and share the most common token length
    (keeps the first n). Raises TaskTokenError if none do."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
    keep: dict[int, list[int]] = {}
    for i in range(len(task)):
        one = Task(task.name, task.clean[i:i + 1], task.corrupted[i:i + 1], task.answers[i:i + 1], task.foils[i:i + 1])
        try:
            one.check(tokenizer)
        except TaskTokenError:
            continue
        keep.setdefault(len(enc(task.clean[i])), []).append(i)
    if not keep:
        raise TaskTokenError(f"no pair of {task.name} tokenises as the task needs on this tokenizer "
                             "(equal lengths, single-token answers); build it from other words")
    idx = max(keep.values(), key=len)[:n]
    pick = lambda xs: [xs[i] for i in idx]
    kept = Task(task.name, pick(task.clean), pick(task.corrupted), pick(task.answers), pick(task.foils))
    return kept.check(tokenizer)
