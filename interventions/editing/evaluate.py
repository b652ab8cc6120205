"""CounterFact-style evaluation of fact edits (Meng et al. 2022), on facts the model knows before any edit.

efficacy        p(new) > p(old) on the edit prompt
generalisation  p(new) > p(old) on paraphrases of it
specificity     p(true object) > p(new) on prompts about neighbouring subjects (same relation, never edited)
fluency         weighted 2-/3-gram entropy of sampled continuations (ROME's measure), edited vs unedited
Probabilities are of the object's first token at the prompt's last position.
"""
from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..erasure.core import Edit
from .facts import Candidate, candidates
from .solver import Fact, _pad_id, batch_ids


@dataclass
class Case:
    """One edit request with its evaluation prompts."""

    relation: str
    fact: Fact                                   # fact.old: the true object
    paraphrases: list[str]
    neighbours: list[tuple[str, str]] = field(default_factory=list)  # (prompt, true object)
    p_clean: float = 0.0


def first_token(tok, word: str) -> int:
    return int(tok(word)["input_ids"][0])


def next_token_probs(lm, prompts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """[n, vocab] next-token probabilities after each prompt (right-padded batches through the engine)."""
    tok = lm.tokenizer
    out = []
    for i in range(0, len(prompts), batch):
        seqs = [list(tok(p)["input_ids"]) for p in prompts[i:i + batch]]
        with torch.no_grad():
            logits = lm.run(batch_ids(seqs, _pad_id(tok))).logits
        last = torch.tensor([len(s) - 1 for s in seqs])
        out.append(logits[torch.arange(len(seqs)), last].float().softmax(-1).cpu())
    return torch.cat(out)


def known_facts(lm, cands: Sequence[Candidate] | None = None, threshold: float = 0.5) -> list[tuple[Candidate, float]]:
    """The candidates whose object's first token has p > threshold after the edit prompt (decided before editing)."""
    cands = list(cands) if cands is not None else candidates()
    probs = next_token_probs(lm, [c.prompt.format(c.subject) for c in cands])
    tok = lm.tokenizer
    ps = [float(probs[i, first_token(tok, c.obj)]) for i, c in enumerate(cands)]
    return [(c, p) for c, p in zip(cands, ps) if p > threshold]


def make_cases(lm, known: Sequence[tuple[Candidate, float]], n_edit: int, n_neighbours: int = 3,
               seed: int = 0) -> tuple[list[Case], list[tuple[Candidate, float]]]:
    """Up to n_edit cases (new object: another object of the same relation, first token different) and the
    reserved known facts their neighbourhood prompts come from (never edited)."""
    tok, rng = lm.tokenizer, random.Random(seed)
    known = list(known)
    rng.shuffle(known)
    by_rel: dict[str, list] = {}
    for c, p in known:
        by_rel.setdefault(c.relation, []).append((c, p))
    reserve = [x for rel in by_rel.values() for x in rel[:max(1, math.ceil(len(rel) / 6))]]
    pool = [x for x in known if x not in reserve][:n_edit]
    objects = {rel: sorted({c.obj for c in candidates() if c.relation == rel}) for rel in by_rel}
    cases = []
    for c, p in pool:
        options = [o for o in objects[c.relation] if first_token(tok, o) != first_token(tok, c.obj)]
        new = rng.choice(options)
        neigh = [(r.prompt.format(r.subject), r.obj) for r, _ in reserve
                 if r.relation == c.relation and first_token(tok, r.obj) != first_token(tok, new)][:n_neighbours]
        cases.append(Case(c.relation, Fact(c.prompt, c.subject, new, old=c.obj),
                          [q.format(c.subject) for q in c.paraphrases], neigh, p))
    return cases, reserve


def score(lm, cases: Sequence[Case]) -> list[dict]:
    """Per case: efficacy, generalisation, specificity (fractions) and the probabilities behind them."""
    tok = lm.tokenizer
    prompts, owners = [], []
    for c in cases:
        prompts += [c.fact.text(), *c.paraphrases, *(q for q, _ in c.neighbours)]
        owners.append(len(prompts))
    probs = next_token_probs(lm, prompts)
    out, start = [], 0
    for c, end in zip(cases, owners):
        P = probs[start:end]
        new, old = first_token(tok, c.fact.target), first_token(tok, c.fact.old)
        para = P[1:1 + len(c.paraphrases)]
        nb = P[1 + len(c.paraphrases):]
        true_nb = torch.tensor([first_token(tok, o) for _, o in c.neighbours], dtype=torch.long)
        spec = [(float(nb[j, t]) > float(nb[j, new])) for j, t in enumerate(true_nb)]
        out.append({"subject": c.fact.subject, "relation": c.relation, "old": c.fact.old, "new": c.fact.target,
                    "efficacy": float(P[0, new] > P[0, old]), "p_new": float(P[0, new]), "p_old": float(P[0, old]),
                    "generalisation": float((para[:, new] > para[:, old]).float().mean()),
                    "specificity": float(sum(spec) / len(spec)) if spec else float("nan"),
                    "neighbour_p_true": float(nb[torch.arange(len(true_nb)), true_nb].mean())
                    if spec else float("nan")})
        start = end
    return out


def ngram_entropy(tokens: Sequence[int], ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: weighted mean of the n-gram entropies (bits) of one text."""
    ents = []
    for n in ns:
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        tot = sum(grams.values())
        ents.append(-sum(v / tot * math.log2(v / tot) for v in grams.values()) if tot else 0.0)
    return float(sum(w * e for w, e in zip(weights, ents)) / len(ents))


def fluency(lm, prompts: Sequence[str], n_tokens: int = 40, seed: int = 0) -> float:
    """Mean n-gram entropy of seeded top-k samples continuing each prompt."""
    tok, ents = lm.tokenizer, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                g = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                                      do_sample=True, top_k=5, pad_token_id=_pad_id(tok))
            ents.append(ngram_entropy(g[0, ids.shape[1]:].tolist()))
    return float(sum(ents) / len(ents))


@contextlib.contextmanager
def edited(model: torch.nn.Module, e: Edit):
    """The edit written into `model` inside the block; the original weights are put back after it."""
    saved = {k: model.get_parameter(k).detach().clone() for k in e.tensors}
    e.apply(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                model.get_parameter(k).copy_(v)
