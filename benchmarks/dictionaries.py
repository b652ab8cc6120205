"""Activation store and SAE training throughput against the plain loops a user would write.

store:  rows/s collecting one residual site over token windows. Plain loop: a torch forward hook on the block,
        the full forward, outputs[:, 1:] kept, concatenated, then one randperm shuffle. interp: ActivationStore
        (memory) with the same filter (skip the BOS position); the forward ends after the site (stop_early).
        Both outputs are compared row for row before timing counts.
train:  rows/s of SAE training steps. Plain loop: a TopK SAE written directly in torch (encode, top-k,
        decode, MSE, Adam, decoder renormalisation), the minimal version of the same step. interp: Trainer.train_step
        (the same plus dead-feature tracking, AuxK when features die, the gradient projection and stats).
Runs alternate plain / interp; medians of --repeats, in process CPU time (one thread: the work done; wall
clock on a shared machine mostly measures the other jobs) and wall-clock time.

    .venv/bin/python benchmarks/dictionaries.py --repeats 3                 # SmolLM2 (135M), blocks.15.resid_post
    .venv/bin/python benchmarks/dictionaries.py --model tiny --repeats 5    # a random 4-layer Llama, seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def plain_store(model, blocks, layer: int, windows: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    got = []
    h = blocks[layer].register_forward_hook(lambda m, i, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch):
                model(windows[i:i + batch])
    finally:
        h.remove()
    rows = torch.cat([g[:, 1:].reshape(-1, g.shape[-1]) for g in got])
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))]


def interp_store(lm, site: str, windows: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    from interp.store import ActivationStore, batched

    st = ActivationStore(lm, site, skip_first=1).fill(batched(windows, batch), progress=False)
    return torch.cat([b[site] for b in st.batches(1 << 30, seed=seed)])


class PlainTopK(torch.nn.Module):
    def __init__(self, d: int, m: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.randn(d, m) / d ** 0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(m))
        self.W_dec = torch.nn.Parameter(self.W_enc.detach().T.clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        v, i = torch.relu(pre).topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, v) @ self.W_dec + self.b_dec


def plain_train(X: torch.Tensor, m: int, k: int, steps: int, batch: int) -> None:
    sae = PlainTopK(X.shape[1], m, k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for s in range(steps):
        x = X[(s * batch) % (X.shape[0] - batch):][:batch]
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)


def interp_train(X: torch.Tensor, m: int, k: int, steps: int, batch: int) -> None:
    from probes.dictionaries import DictConfig, TrainConfig, Trainer

    t = Trainer(DictConfig(d_in=X.shape[1], d_sae=m, kind="topk", k=k), TrainConfig(progress=False))
    for s in range(steps):
        t.train_step(X[(s * batch) % (X.shape[0] - batch):][:batch], None)


def _model(name: str):
    import interp

    if name == "smollm2":
        model = interp.zoo.load("smollm2")
        return model, 15
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval(), 1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    ap.add_argument("--windows", type=int, default=16, help="token windows of --seq-len for the store")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="SAE training steps per timing")
    ap.add_argument("--sae-batch", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import interp

    model, layer = _model(args.model)
    lm = interp.attach(model)
    site = f"blocks.{layer}.resid_post"
    vocab = model.config.vocab_size
    W = torch.randint(0, vocab, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    blocks = model.model.layers
    a, b = plain_store(model, blocks, layer, W, args.batch, 0), interp_store(lm, site, W, args.batch, 0)
    assert a.shape == b.shape and torch.allclose(a.sort(0).values, b.sort(0).values, atol=1e-5), "store rows differ"
    res: dict = {"model": args.model, "site": site, "rows": int(a.shape[0]), "store": {"plain": [], "interp": []},
                 "train": {"plain": [], "interp": []}}
    X = a.float()
    m = args.expansion * X.shape[1]
    for _ in range(args.repeats):
        for name, fn in (("plain", lambda: plain_store(model, blocks, layer, W, args.batch, 0)),
                         ("interp", lambda: interp_store(lm, site, W, args.batch, 0))):
            _, cpu, wall = _timed(fn)
            res["store"][name].append((cpu, wall))
        for name, fn in (("plain", lambda: plain_train(X, m, args.k, args.steps, args.sae_batch)),
                         ("interp", lambda: interp_train(X, m, args.k, args.steps, args.sae_batch))):
            torch.manual_seed(0)
            _, cpu, wall = _timed(fn)
            res["train"][name].append((cpu, wall))
    n_store, n_train = a.shape[0], args.steps * args.sae_batch
    summary = {}
    for job, n in (("store", n_store), ("train", n_train)):
        for name in ("plain", "interp"):
            cpu = statistics.median(c for c, _ in res[job][name])
            wall = statistics.median(w for _, w in res[job][name])
            summary[f"{job}_{name}_rows_per_cpu_s"] = n / cpu
            summary[f"{job}_{name}_rows_per_wall_s"] = n / wall
        ratio = summary[f"{job}_interp_rows_per_cpu_s"] / summary[f"{job}_plain_rows_per_cpu_s"]
        summary[f"{job}_interp_over_plain_cpu"] = ratio
    out = {"model": args.model, "site": site, "store_rows": n_store, "train_rows": n_train, "d_in": X.shape[1],
           "d_sae": m, "k": args.k, "repeats": args.repeats, **summary}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
