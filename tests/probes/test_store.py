"""The activation store: rows equal plain torch-hook captures, seeded shuffles, filters, dtype, disk resume."""
import json

import pytest
import torch

import interp
from interp.store import ActivationCollector, ActivationStore, StoreError, batched, stream, token_windows


def tiny_llama(seed=0, layers=3, d=32, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def plain_capture(model, ids, layer):
    """What a user would write: a forward hook on the block, outputs kept."""
    got = []
    def keep(m, i, o):
        got.append((o[0] if isinstance(o, tuple) else o).detach())
    h = model.model.layers[layer].register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return got[0]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _ids(n=12, T=10, seed=1, vocab=128):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stop_early", [True, False])
def test_rows_equal_plain_hooks_and_trace_back(llama, stop_early):
    ids = _ids()
    col = ActivationCollector(llama, ["blocks.1.resid_post", "blocks.0.resid_post"], skip_first=1,
                              stop_early=stop_early)
    assert col.names == ["blocks.0.resid_post", "blocks.1.resid_post"]  # forward order
    rows = col.rows(ids, item_offset=100)
    for layer in (0, 1):
        ref = plain_capture(llama, ids, layer)
        want = ref[:, 1:].reshape(-1, ref.shape[-1])
        assert torch.equal(rows[f"blocks.{layer}.resid_post"], want)
    # every row knows its token, input item and position
    assert torch.equal(rows["token"], ids[rows["item"] - 100, rows["pos"]])
    assert rows["pos"].min() == 1 and rows["item"].max() == 100 + ids.shape[0] - 1


def test_keep_filter_and_dtype(llama):
    ids = _ids()
    col = ActivationCollector(llama, "blocks.2.resid_post", keep=lambda t: t % 2 == 0, dtype=torch.float16)
    rows = col.rows(ids)
    assert rows["blocks.2.resid_post"].dtype == torch.float16
    assert bool((rows["token"] % 2 == 0).all()) and rows["token"].numel() == int((ids % 2 == 0).sum())
    ref = plain_capture(llama, ids, 2)[ids % 2 == 0]
    assert torch.equal(rows["blocks.2.resid_post"], ref.to(torch.float16))


def test_memory_and_disk_stores_agree_and_shuffle_is_seeded(llama, tmp_path):
    ids = _ids(24)
    mem = ActivationStore(llama, "blocks.1.resid_post", shard_rows=50).fill(batched(ids, 4), progress=False)
    disk = ActivationStore(llama, "blocks.1.resid_post", shard_rows=50, directory=tmp_path / "s").fill(
        batched(ids, 4), progress=False)
    assert len(mem) == len(disk) == 24 * 10
    a, b = mem.tensors(), ActivationStore.open(tmp_path / "s").tensors()
    for k in a:
        assert torch.equal(a[k], b[k])
    b1 = [x["pos"] for x in disk.batches(32, seed=3)]
    b2 = [x["pos"] for x in ActivationStore.open(tmp_path / "s").batches(32, seed=3)]
    b3 = [x["pos"] for x in disk.batches(32, seed=4)]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    assert not all(torch.equal(x, y) for x, y in zip(b1, b3))
    allrows = torch.cat([x["blocks.1.resid_post"] for x in disk.batches(32, seed=3)])
    assert allrows.shape == a["blocks.1.resid_post"].shape  # a permutation: every row exactly once
    assert torch.allclose(allrows.sum(0), a["blocks.1.resid_post"].sum(0), atol=1e-3)
    # consecutive shuffled rows come from different inputs (items), unlike storage order
    first = next(iter(disk.batches(32, seed=3)))["item"]
    assert first.unique().numel() > 4


def test_resume_skips_consumed_batches(llama, tmp_path):
    ids = _ids(16)
    d = tmp_path / "r"

    class Boom(Exception):
        pass

    def interrupted():
        for i, b in enumerate(batched(ids, 2)):
            if i == 5:
                raise Boom
            yield b

    with pytest.raises(Boom):
        ActivationStore(llama, "blocks.0.resid_post", shard_rows=40, directory=d).fill(interrupted(), progress=False)
    meta = json.loads((d / "store.json").read_text())
    assert meta["batches"] == 4 and meta["rows"] == 80  # two flushed shards of two batches each
    seen = []

    def counting():
        for b in batched(ids, 2):
            seen.append(b)
            yield b

    st = ActivationStore(llama, "blocks.0.resid_post", shard_rows=40, directory=d).fill(counting(), progress=False)
    full = ActivationStore(llama, "blocks.0.resid_post", shard_rows=40).fill(batched(ids, 2), progress=False)
    assert len(st) == len(full) == 160
    for k, v in full.tensors().items():
        assert torch.equal(st.tensors()[k], v), k
    with pytest.raises(StoreError, match="holds sites"):
        ActivationStore(llama, "blocks.1.resid_post", directory=d)


def test_stream_and_max_rows(llama):
    ids = _ids(20)
    got = list(stream(llama, "blocks.0.resid_post", batched(ids, 4), 16, buffer_rows=64, seed=0, progress=False,
                      max_rows=150))
    rows = torch.cat([g["blocks.0.resid_post"] for g in got])
    assert rows.shape[0] == 150
    ref = plain_capture(llama, ids, 0).reshape(-1, 32)[:150]
    # the same multiset of rows (order shuffled)
    assert torch.allclose(rows.sum(0), ref.sum(0), atol=1e-3)
    assert not torch.equal(rows, ref)


def test_token_windows_and_errors(gpt2_tokenizer, llama):
    assert gpt2_tokenizer.bos_token_id == gpt2_tokenizer.eos_token_id  # GPT-2 has BOS == EOS
    wins = list(token_windows(gpt2_tokenizer, ["hello world, this is a test of windows"] * 5, 8))
    assert all(w.shape == (8,) for w in wins) and all(int(w[0]) == gpt2_tokenizer.bos_token_id for w in wins)
    with pytest.raises(interp.UnknownSiteError):
        ActivationCollector(llama, "blocks.9.resid_post")
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore.open("/nonexistent/store")


def test_generic_module_store():
    """Any nn.Module (generic adapter): float inputs, full forward with capture=, no token ids."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4, 6)
    st = ActivationStore(net, "module:1").fill([x[:3], x[3:]], progress=False)
    rows = st.tensors()
    assert torch.equal(rows["module:1"], torch.relu(net[0](x)).detach().reshape(-1, 6))
    assert bool((rows["token"] == -1).all()) and rows["item"].max() == 4
