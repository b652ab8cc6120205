"""Grids over 2 CPU processes (torchrun, gloo) equal the one-process grid bit for bit; sweeps resume.

One torchrun launch (tests/scale/dist_worker.py) runs every scenario, `interp demo` through the CLI,
and then a resumable sweep whose metric raises on rank 1, so torchrun kills rank 0: a sweep that dies.
The test resumes that sweep here, in one process, from the chunks the two ranks saved. The
one-process references are computed here on the same saved weights, with one thread (as torchrun's
workers have).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interp import Patch, at
from interp.distributed import DistributedError, _row_cost, _Shard, fingerprint
from interp.metrics import logit_diff

from .conftest import W

HERE = Path(__file__).parent
REPO = HERE.parent.parent


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory, gpt2_tokenizer):
    """A 2-layer GPT-2 with the real GPT-2 tokenizer, saved for `interp demo --model FOLDER`."""
    from ..conftest import tiny_gpt2

    d = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(d)
    gpt2_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def lm(model_dir):
    return W.load(str(model_dir))


@pytest.fixture(scope="module")
def launched(model_dir, cli_model, tmp_path_factory):
    """(completed torchrun process, its output folder)."""
    out = tmp_path_factory.mktemp("dist-out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "dist_worker.py"), str(model_dir), str(out), str(cli_model)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert (out / "rank1.json").exists(), run.stdout[-3000:] + run.stderr[-5000:]
    return run, out


def test_two_gloo_processes_equal_one_process_bit_for_bit(lm, launched):
    _, out = launched
    got = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name, fn in W.scenarios(lm).items():
        ref = fn(distributed=False)
        for r in (0, 1):  # gathered on rank 0 and broadcast to rank 1
            assert got[r][name].dtype == ref.dtype and torch.equal(got[r][name], ref), (name, r)
    # the work really was split: both ranks computed rows, and the rows really differ
    dist = info[0]["distributed"]
    assert dist["world_size"] == 2 and min(dist["rows_computed_per_rank"]) > 0
    assert sum(dist["rows_computed_per_rank"]) == info[0]["stats"]["rows"] == len(W.mixed_rows(lm))
    ref = W.scenarios(lm)["mixed"](distributed=False)
    assert (ref - ref[0]).abs().amax() > 1e-3


def test_broadcast_false_leaves_the_full_result_on_rank_0_only(lm, launched):
    _, out = launched
    ref = W.scenarios(lm)["mixed"](distributed=False)
    r0 = load_file(str(out / "rank0.safetensors"))["no_broadcast"]
    r1 = load_file(str(out / "rank1.safetensors"))["no_broadcast"]
    assert torch.equal(r0, ref)
    own = (r1 == ref).flatten(1).all(1)
    zeros = (r1 == 0).flatten(1).all(1)
    assert own.any() and zeros.any() and bool((own | zeros).all())  # rank 1: its own rows, zeros elsewhere


def test_ranks_with_different_grids_refuse_with_a_clear_error(launched):
    _, out = launched
    for r in (0, 1):
        msg = json.loads((out / f"rank{r}.json").read_text())["mismatch"]
        assert msg and "different sweep" in msg and "distributed=False" in msg


def test_cli_under_torchrun_writes_and_prints_once_and_matches_one_process(launched, cli_model, tmp_path):
    """recipes.cli.main (what `torchrun -m recipes demo` runs) on 2 ranks: rank 0 prints and writes the
    same numbers as a one-process `interp demo`; rank 1 prints nothing and writes nowhere in --out."""
    from interp.results import Result
    from recipes.cli import main

    _, out = launched
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["cli_rc"] == info[1]["cli_rc"] == 0
    assert "heatmap:" in info[0]["cli_stdout"] and info[1]["cli_stdout"] == ""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", *W.CLI_ARGS, "--model", str(cli_model), "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(n)
    two = Result.load(out / "cli" / "resid_pre_patching")
    one = Result.load(tmp_path / "one" / "resid_pre_patching")
    assert torch.equal(two.values, one.values) and two.coords == one.coords
    assert sorted(p.name for p in (out / "cli").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_sweep_killed_in_a_process_group_resumes_to_the_same_result(lm, launched):
    run, out = launched
    assert run.returncode != 0 and "metric raised on purpose" in run.stdout + run.stderr
    saved = list((out / "resume").glob("chunk-*.safetensors"))
    assert saved, "the crashed launch saved no chunk"
    n = len(W.mixed_rows(lm))
    ref = lm.run_grid(W.prompts()[1], W.mixed_rows(lm), W.crashing_logit_diff, progress=False, chunk_rows=2,
                      reuse_prefix=False)
    index = json.loads(next((out / "resume").glob("sweep-*.json")).read_text())
    assert not index["complete"]
    g = W.resumable(lm, str(out / "resume"))  # here: one process resumes what two processes saved
    assert g.stats["resumed_rows"] == 2 * len(saved) and 0 < g.stats["resumed_rows"] < n
    assert g.stats["distributed"]["rows_computed_per_rank"] == [n - g.stats["resumed_rows"]]
    assert torch.equal(g.values, ref.values)
    index = json.loads(next((out / "resume").glob("sweep-*.json")).read_text())
    assert index["complete"] and index["rows"] == n and "Patch('blocks.0.resid_pre')" in index["descriptions"][0]


# -- in one process: the chunk hook, the store and resumption ---------------------------------------

def _rows(lm):
    clean, _ = W.prompts()
    src = lm.run(clean, capture="blocks.*.resid_pre").cache
    return [[Patch(f"blocks.{l}.resid_pre", src[f"blocks.{l}.resid_pre"], where=at(pos=p))]
            for l in range(4) for p in range(W.T)]


def test_simulated_ranks_split_the_engine_plan_and_cover_every_row_once(lm):
    """Three 'ranks' in one process: each computes its chunks of the same plan; together they give
    the full grid bit for bit, and no row is computed twice."""
    rows, base = _rows(lm), W.prompts()[1]
    ref = lm.engine.run_grid(base, rows, W.last_logits, progress=False)
    parts, owners = [], []
    for rank in range(3):
        shard = _Shard(rank, 3, _row_cost(lm.engine, rows), None)
        parts.append(lm.engine.run_grid(base, rows, W.last_logits, progress=False, chunk_hook=shard).values)
        owners.append(shard.owner)
        assert shard.computed > 0
    assert owners[0] == owners[1] == owners[2] and sorted(owners[0]) == list(range(len(rows)))
    merged = torch.stack([parts[owners[0][r]][r] for r in range(len(rows))])
    assert torch.equal(merged, ref.values)


class Flaky:
    """A metric that raises (like ctrl-C) after `fail_after` calls past the base run. Its state is in
    private attributes: the sweep fingerprint covers a metric object's public attributes only."""

    def __init__(self, metric, fail_after=None):
        self.metric, self._left = metric, fail_after

    def __call__(self, logits):
        if self._left is not None:
            if self._left == 0:
                raise KeyboardInterrupt("stopped mid-sweep")
            self._left -= 1
        return self.metric(logits)


def test_metric_failing_mid_sweep_resumes_from_saved_chunks(lm, tmp_path):
    rows, base = _rows(lm), W.prompts()[1]
    kw = dict(progress=False, chunk_rows=4, reuse_prefix=False)
    ref = lm.run_grid(base, rows, Flaky(logit_diff(5, 9)), **kw)
    with pytest.raises(KeyboardInterrupt):
        lm.run_grid(base, rows, Flaky(logit_diff(5, 9), fail_after=1 + 3), resume_dir=tmp_path, **kw)
    assert len(list(tmp_path.glob("chunk-*.safetensors"))) == 3  # base run + 3 chunks measured, then stopped
    index = json.loads(next(tmp_path.glob("sweep-*.json")).read_text())
    assert not index["complete"] and index["rows"] == len(rows)
    (tmp_path / ".chunk-leftover.safetensors.tmp").write_bytes(b"half a file")  # what a kill can leave
    g = lm.run_grid(base, rows, Flaky(logit_diff(5, 9)), resume_dir=tmp_path, **kw)
    assert g.stats["resumed_rows"] == 12 and g.stats["distributed"]["rows_computed_per_rank"] == [len(rows) - 12]
    assert torch.equal(g.values, ref.values)
    assert json.loads(next(tmp_path.glob("sweep-*.json")).read_text())["complete"]


def test_a_changed_sweep_reuses_nothing(lm, tmp_path):
    """Chunks are keyed by the sweep's content: another metric, other source values or other
    options are another sweep."""
    rows, base = _rows(lm), W.prompts()[1]
    kw = dict(progress=False, chunk_rows=4, reuse_prefix=False, resume_dir=tmp_path)
    assert lm.run_grid(base, rows, logit_diff(5, 9), **kw).stats["resumed_rows"] == 0
    assert lm.run_grid(base, rows, logit_diff(5, 9), **kw).stats["resumed_rows"] == len(rows)
    assert lm.run_grid(base, rows, logit_diff(5, 8), **kw).stats["resumed_rows"] == 0
    nudged = [[Patch(op.site, op.source + 1e-3, where=op.where) for op in row] for row in rows]
    assert lm.run_grid(base, nudged, logit_diff(5, 9), **kw).stats["resumed_rows"] == 0
    assert lm.run_grid(base, rows, logit_diff(5, 9), **dict(kw, chunk_rows=5)).stats["resumed_rows"] == 0
    assert fingerprint(lm.engine, base, rows, logit_diff(5, 9), {}) == fingerprint(lm.engine, base.clone(), rows,
                                                                                  logit_diff(5, 9), {"progress": False})


def test_distributed_true_without_a_process_group_says_how_to_launch(lm):
    with pytest.raises(DistributedError, match="torchrun"):
        lm.run_grid(W.prompts()[1], _rows(lm)[:2], distributed=True)


def test_unwritable_resume_dir_is_a_clear_error(lm, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DistributedError, match="resume_dir"):
        lm.run_grid(W.prompts()[1], _rows(lm)[:2], resume_dir=blocker / "sub")


def test_positional_packs_are_saved_as_they_finish(lm, tmp_path):
    """With prefix reuse on, rows run as positional packs; a sweep stopped mid-way must have kept the
    packs that finished (they used to be saved only once every pack had run)."""
    rows, base = _rows(lm), W.prompts()[1]
    kw = dict(progress=False, memory_budget=1 << 14)  # a small budget: many packs
    ref = lm.run_grid(base, rows, Flaky(logit_diff(5, 9)), **kw)
    assert ref.stats["packed_rows"] > 0
    with pytest.raises(KeyboardInterrupt):
        lm.run_grid(base, rows, Flaky(logit_diff(5, 9), fail_after=6), resume_dir=tmp_path, **kw)
    saved = len(list(tmp_path.glob("chunk-*.safetensors")))
    assert saved >= 2
    g = lm.run_grid(base, rows, Flaky(logit_diff(5, 9)), resume_dir=tmp_path, **kw)
    assert g.stats["resumed_rows"] > 0
    torch.testing.assert_close(g.values, ref.values, rtol=1e-5, atol=1e-6)
