"""Worker launched by tests/scale/test_distributed.py under torchrun (2 CPU processes, gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/scale/dist_worker.py MODEL OUT CLI_MODEL

Runs every scenario (gathered values written by each rank), then `interp demo` through recipes.cli.main
(the code behind `torchrun -m recipes demo`) on CLI_MODEL, then a resumable sweep whose metric raises on
rank 1 after two chunks: the launch fails on purpose, and the test resumes the sweep in one process.
The scenarios are imported by the test (as module `dist_worker`, the name they have here too, so that
functions hash the same in the sweep fingerprint) to compute the one-process references.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import interp
from interp import Ablate, Add, Noise, Patch, at
from interp.metrics import logit_diff

T = 8


def load(folder: str) -> interp.Instrumented:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    return interp.attach(LlamaForCausalLM.from_pretrained(folder).eval())


def save_model(folder: str) -> None:
    """A 4-layer grouped-query Llama with random weights, saved for every process to load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=32)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)


def prompts():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 97, (2, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 5) % 97
    return clean, corrupted


def last_logits(logits):
    return logits[:, -1]


def mixed_rows(lm):
    """Rows of every op kind at every layer: patches (also per head and windows), adds, noise, ablations."""
    clean, _ = prompts()
    src = lm.run(clean, capture=["blocks.*.resid_pre", "blocks.*.attn.z", "blocks.*.mlp.out"]).cache
    vec = torch.linspace(-1, 1, 64)
    rows = []
    for l in range(4):
        for p in (0, 2, 5, T - 1):
            rows.append([Patch(f"blocks.{l}.resid_pre", src[f"blocks.{l}.resid_pre"], where=at(pos=p))])
        rows.append([Patch(f"blocks.{l}.attn.z", src[f"blocks.{l}.attn.z"], where=at(heads=l % 4))])
        rows.append([Add(f"blocks.{l}.resid_pre", vec, alpha=0.5, norm="relative", where=at(pos=[3, 4]))])
        rows.append([Noise(f"blocks.{l}.mlp.out", std=0.3, seed=l, where=at(pos=slice(1, 4)))])
        rows.append([Ablate(f"blocks.{l}.mlp.out", "zero", where=at(pos=T - 1))])
        rows.append([Patch(f"blocks.{j}.mlp.out", src[f"blocks.{j}.mlp.out"], where=at(pos=2)) for j in range(l, 4)])
    return rows


def scenarios(lm) -> dict:
    """name -> function(**run_grid options) -> values tensor. The same code runs in 1 and in 2 processes."""
    from interventions.patching import patch_sweep

    clean, corrupted = prompts()
    rows = mixed_rows(lm)
    return {
        # patch_sweep passes its keyword arguments through to run_grid: the distributed path is reached from it
        "patch_sweep": lambda **kw: patch_sweep(lm, clean, corrupted, "resid_pre", metric=logit_diff(5, 9),
                                                progress=False, **kw).values,
        "mixed": lambda **kw: lm.run_grid(corrupted, rows, last_logits, progress=False, **kw).values,
        "mixed_chunked": lambda **kw: lm.run_grid(corrupted, rows, last_logits, progress=False, chunk_rows=3,
                                                  reuse_prefix=False, **kw).values,
    }


class Crash(RuntimeError):
    pass


CRASH_AFTER: int | None = None  # module state, not closure state: it must not change the sweep's fingerprint
CALLS = [0]


def crashing_logit_diff(logits):
    """logit_diff(5, 9) that raises once CRASH_AFTER chunks have been measured (after the base run)."""
    if CRASH_AFTER is not None:
        CALLS[0] += 1
        if CALLS[0] > CRASH_AFTER + 1:
            raise Crash(f"metric raised on purpose after {CRASH_AFTER} chunks")
    return logits[:, -1, 5].float() - logits[:, -1, 9].float()


def resumable(lm, resume_dir: str):
    """The sweep that crashes and resumes: 2 rows per chunk, full forwards (many chunks)."""
    rows = mixed_rows(lm)
    return lm.run_grid(prompts()[1], rows, crashing_logit_diff, progress=False, chunk_rows=2, reuse_prefix=False,
                       resume_dir=resume_dir)


def main(folder: str, out: str, cli_model: str) -> None:
    import contextlib
    import io

    from safetensors.torch import save_file

    import interp.distributed as D
    from recipes.cli import main as cli

    rank, world = D.init()
    assert world == 2 and D.active(), (rank, world)
    lm = load(folder)
    out = Path(out)
    tensors, info = {}, {}
    for name, fn in scenarios(lm).items():
        tensors[name] = fn().contiguous()
    g = lm.run_grid(prompts()[1], mixed_rows(lm), last_logits, progress=False, broadcast=False)
    tensors["no_broadcast"] = g.values.contiguous()
    info["stats"] = {k: v for k, v in g.stats.items() if k != "distributed"}
    info["distributed"] = g.stats["distributed"]
    try:  # each rank asks for a different grid: every rank must refuse
        lm.run_grid(prompts()[1], mixed_rows(lm)[rank:], last_logits, progress=False)
        info["mismatch"] = None
    except D.DistributedError as e:
        info["mismatch"] = str(e)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        info["cli_rc"] = cli(["demo", *CLI_ARGS, "--model", cli_model, "--out", str(out / "cli")])
    info["cli_stdout"] = printed.getvalue()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    D._dist().barrier()
    global CRASH_AFTER
    CRASH_AFTER = 2 if rank == 1 else None
    resumable(lm, str(out / "resume"))


CLI_ARGS = ["--clean", "The cat sat on the mat", "--corrupted", "The dog sat on the mat",
            "--target", " mat", "--foil", " cat"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import dist_worker  # the functions must live in module `dist_worker`, as in the test, not `__main__`

    dist_worker.main(*sys.argv[1:4])
