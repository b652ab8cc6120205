"""Circuits: graph, EAP / EAP-IG against TransformerLens and a per-receiver plain-hook reference, exact edge
patching against a per-edge plain-hook loop, circuit evaluation, faithfulness, MIB files, tasks, figures."""
from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

import interp
from interventions import circuits as C

from ..conftest import tiny_gpt2

VOCAB = 100


def tiny_llama(seed=0, layers=2, heads=4, kv=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def pair(seed=1, b=2, T=6, at=2):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (b, T), generator=g)
    corr = clean.clone()
    corr[:, at] = (clean[:, at] + 1 + torch.randint(0, VOCAB - 1, (b,), generator=g)) % VOCAB
    return clean, corr


def metric(lg):
    return lg[:, -1, 5] - lg[:, -1, 7]


# ------------------------------------------------------------------------------------------------
# plain-hook references (registered here, in the test, on the HF modules directly)
# ------------------------------------------------------------------------------------------------

class Ref:
    """The receivers' inputs of a GPT-2 or Llama HF model through plain torch hooks."""

    def __init__(self, model):
        self.m = model
        self.gpt2 = hasattr(model, "transformer")
        self.blocks = model.transformer.h if self.gpt2 else model.model.layers
        cfg = model.config
        self.H = cfg.num_attention_heads
        self.KV = getattr(cfg, "num_key_value_heads", None) or self.H
        self.d = cfg.hidden_size
        self.dh = self.d // self.H

    def attn(self, l):
        return self.blocks[l].attn if self.gpt2 else self.blocks[l].self_attn

    def ln1(self, l):
        return self.blocks[l].ln_1 if self.gpt2 else self.blocks[l].input_layernorm

    def ln2(self, l):
        return self.blocks[l].ln_2 if self.gpt2 else self.blocks[l].post_attention_layernorm

    def final(self):
        return self.m.transformer.ln_f if self.gpt2 else self.m.model.norm

    def o_proj(self, l):
        return self.attn(l).c_proj if self.gpt2 else self.attn(l).o_proj

    def head_out(self, l, z):  # z [b, T, H*dh] -> [H, b, T, d]
        W = self.o_proj(l).weight
        Wh = W.view(self.H, self.dh, self.d) if self.gpt2 else W.T.reshape(self.H, self.dh, self.d)
        return torch.einsum("bthe,hed->hbtd", z.unflatten(-1, (self.H, self.dh)), Wh)

    def capture(self, ids):
        """Sender outputs [S, b, T, d] in graph order (input, heads and MLP of each layer)."""
        got, hs = {}, []
        hs.append(self.blocks[0].register_forward_pre_hook(
            lambda mod, a, k: got.__setitem__("in", (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True))
        for l in range(len(self.blocks)):
            hs.append(self.o_proj(l).register_forward_pre_hook(
                lambda mod, a, l=l: got.__setitem__(("z", l), a[0].detach())))
            hs.append(self.blocks[l].mlp.register_forward_hook(
                lambda mod, a, o, l=l: got.__setitem__(("m", l), o.detach())))
        try:
            with torch.no_grad():
                self.m(ids)
        finally:
            for h in hs:
                h.remove()
        outs = [got["in"][None]]
        for l in range(len(self.blocks)):
            outs += [self.head_out(l, got[("z", l)]), got[("m", l)][None]]
        return torch.cat(outs).detach()

    @contextlib.contextmanager
    def add_at(self, r, add):
        """Hooks putting `add` [b, T, d] into receiver r's input only (its own norm recomputed)."""
        hs, st = [], {}
        try:
            if r.kind == "logits":
                hs.append(self.final().register_forward_pre_hook(lambda mod, a: (a[0] + add,)))
            elif r.kind == "mlp":
                l = r.layer
                hs.append(self.ln2(l).register_forward_pre_hook(lambda mod, a: st.__setitem__("mid", a[0])))
                hs.append(self.blocks[l].mlp.register_forward_pre_hook(
                    lambda mod, a: (self.ln2(l)(st["mid"] + add),)))
            else:
                l, c, h = r.layer, r.kind, r.head
                hs.append(self.blocks[l].register_forward_pre_hook(
                    lambda mod, a, k: st.__setitem__("pre", a[0] if a else k["hidden_states"]), with_kwargs=True))
                if self.gpt2:
                    mod = self.attn(l).c_attn
                    cols = slice("qkv".index(c) * self.d + h * self.dh, "qkv".index(c) * self.d + (h + 1) * self.dh)
                else:
                    mod = getattr(self.attn(l), f"{c}_proj")
                    cols = slice(h * self.dh, (h + 1) * self.dh)

                def fix(module, a, out):
                    new = out.clone()
                    new[..., cols] = module.forward(self.ln1(l)(st["pre"] + add))[..., cols]
                    return new
                hs.append(mod.register_forward_hook(fix))
            yield
        finally:
            for h in hs:
                h.remove()


def ref_eap(model, graph, clean, corr, steps=None):
    """EAP (steps=None) or EAP-IG over the inputs: one receiver at a time, a zero leaf added at its input."""
    ref = Ref(model)
    delta = ref.capture(clean) - ref.capture(corr)
    b, T = clean.shape
    emb_c, emb_x = ref.capture(clean)[0], ref.capture(corr)[0]
    alphas = [None] if steps is None else [k / steps for k in range(1, steps + 1)]
    scores = torch.zeros(graph.n_edges, dtype=torch.float64)
    for ri, r in enumerate(graph.receivers):
        g = torch.zeros(b, T, ref.d, dtype=torch.float64)
        for a in alphas:
            eps = torch.zeros(b, T, ref.d, requires_grad=True)
            hooks = []
            if a is not None:
                hooks.append(ref.blocks[0].register_forward_pre_hook(
                    lambda mod, args, kw, a=a: ((emb_x + a * (emb_c - emb_x),) + args[1:], kw) if args
                    else (args, {**kw, "hidden_states": emb_x + a * (emb_c - emb_x)}), with_kwargs=True))
            try:
                with ref.add_at(r, eps):
                    m = metric(model(corr).logits).sum()
            finally:
                for h in hooks:
                    h.remove()
            m.backward()
            g += eps.grad.double()
        g /= len(alphas)
        for e in torch.nonzero(graph.dst == ri).flatten().tolist():
            scores[e] = (delta[int(graph.src[e])].double() * g).sum() / b
    return scores.float()


def ref_edge_loop(model, graph, base, source, edges=None):
    """Exact edge patching, one full forward per edge with plain hooks: mean m(patched) - m(base)."""
    ref = Ref(model)
    delta = ref.capture(source) - ref.capture(base)
    with torch.no_grad():
        m0 = metric(model(base).logits).mean()
        out = []
        for e in (range(graph.n_edges) if edges is None else edges):
            with ref.add_at(graph.receivers[int(graph.dst[e])], delta[int(graph.src[e])]):
                out.append(metric(model(base).logits).mean() - m0)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------------

def test_graph_counts_and_names_gpt2_and_gqa():
    g = C.Parts(interp.attach(tiny_gpt2(n_layer=2, vocab=VOCAB))).graph
    # receivers: 2 layers x (3*4 head inputs + 1 MLP) + logits; senders: input + 2 x (4 heads + 1 MLP)
    assert len(g.receivers) == 27 and len(g.senders) == 11
    # edges: layer 0 heads read input (12), m0 reads input + 4 heads (5), layer 1 heads read 6 senders (72),
    # m1 reads 10, logits read 11
    assert g.n_edges == 12 + 5 + 72 + 10 + 11
    names = g.edge_names
    assert "input->a0.h0<q>" in names and "a0.h3->a1.h2<v>" in names and "m1->logits" in names
    assert "a1.h0->m0" not in names and "m0->a0.h0<q>" not in names
    q = C.Parts(interp.attach(tiny_llama())).graph
    # GQA: 4 query heads, 2 KV heads -> per layer 4 q + 2 k + 2 v receivers
    assert len(q.receivers) == 2 * (4 + 2 + 2 + 1) + 1
    assert "input->a0.kv1<k>" in q.edge_names and "input->a0.h3<q>" in q.edge_names
    assert not any(n.endswith("a0.h3<k>") for n in q.edge_names)


def test_residual_check_passes_and_refuses_what_is_not_a_sum():
    lm = interp.attach(tiny_gpt2(n_layer=2, vocab=VOCAB))
    parts = C.Parts(lm)
    clean, _ = pair()
    cache = dict(lm.run(clean, capture=parts.capture_sites()).cache.items())
    parts.check(cache)
    # heads that no longer add up to what entered the stream (a scale between head and residual)
    cache["blocks.1.attn.z"] = cache["blocks.1.attn.z"] * 3
    with pytest.raises(C.CircuitGraphError, match="not the sum"):
        parts.check(cache)


def test_refuses_models_without_exact_edges(minilm_dir):
    from transformers import AutoModel, GPTNeoXConfig, GPTNeoXForCausalLM

    with pytest.raises(C.CircuitGraphError, match="hf_lm"):
        C.Parts(interp.attach(AutoModel.from_pretrained(str(minilm_dir)).eval()))
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=VOCAB, use_parallel_residual=True))
    with pytest.raises(C.CircuitGraphError, match="parallel"):
        C.Parts(interp.attach(neox.eval()))
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma2 = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            vocab_size=VOCAB))
    with pytest.raises(C.CircuitGraphError, match="normalises"):
        C.Parts(interp.attach(gemma2.eval()))


# ------------------------------------------------------------------------------------------------
# EAP / EAP-IG
# ------------------------------------------------------------------------------------------------

def _tl_edge_scores(model, clean, corr):
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    bridge = build_bridge_from_module(copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config)
    res = attribution_patch(bridge, clean, corr, lambda lg: metric(lg).sum(), EdgeAttributionConfig(granularity="edge"))

    def name(n):
        return {"embed": "input", "mlp_out": f"m{n.layer}", "mlp_in": f"m{n.layer}", "logits": "logits",
                "attn_head_out": f"a{n.layer}.h{n.head}"}.get(n.kind) or f"a{n.layer}.h{n.head}<{n.kind[0]}>"
    out: dict[str, float] = {}
    for (w, r), v in res.edge_scores.items():  # TL scores each position; an edge here sums them
        k = f"{name(w)}->{name(r)}"
        out[k] = out.get(k, 0.0) + v
    return out


def test_eap_equals_transformer_lens_edge_attribution():
    model = tiny_gpt2(n_layer=3, vocab=VOCAB)
    clean, corr = pair(b=3, T=7)
    ours = C.eap(interp.attach(model), clean, corr, metric)
    tl = _tl_edge_scores(model, clean, corr)
    assert set(tl) == set(ours.coords["edge"])
    want = torch.tensor([tl[n] for n in ours.coords["edge"]])
    assert (ours.values - want).abs().max() <= 1e-5
    assert want.abs().max() > 1e-3


@pytest.mark.parametrize("make", [lambda: tiny_gpt2(n_layer=2, vocab=VOCAB), tiny_llama], ids=["gpt2", "gqa-llama"])
def test_eap_and_eap_ig_equal_a_per_receiver_reference(make):
    model = make()
    lm = interp.attach(model)
    parts = C.Parts(lm)
    clean, corr = pair()
    got = C.eap(parts, clean, corr, metric)
    want = ref_eap(model, parts.graph, clean, corr)
    assert (got.values - want).abs().max() <= 1e-5 and want.abs().max() > 1e-3
    ig = C.eap(parts, clean, corr, metric, method="eap-ig", steps=3)
    want_ig = ref_eap(model, parts.graph, clean, corr, steps=3)
    assert (ig.values - want_ig).abs().max() <= 1e-5
    assert ig.attrs["forward_backward_passes"] == 1  # the 3 steps ran as one batched forward/backward
    split = C.eap(parts, clean, corr, metric, method="eap-ig", steps=3, steps_per_pass=2)
    assert split.attrs["forward_backward_passes"] == 2
    assert (split.values - ig.values).abs().max() <= 1e-5


@pytest.mark.parametrize("make", [lambda: tiny_gpt2(n_layer=2, vocab=VOCAB), tiny_llama], ids=["gpt2", "gqa-llama"])
def test_eap_ig_completeness_over_the_inputs(make):
    """Every receiver reads the input directly, so the receivers' gradients add up to dm/d(input): the
    input's edge scores sum to IG's attribution of the input, which tends to m(clean) - m(corrupted) as
    the steps grow (right Riemann sum, error ~ 1/n)."""
    model = make()
    parts = C.Parts(interp.attach(model))
    clean, corr = pair()
    with torch.no_grad():
        total = float((metric(model(clean).logits) - metric(model(corr).logits)).double().mean())
    err = []
    for n in (4, 16, 64):
        ig = C.eap(parts, clean, corr, metric, method="eap-ig", steps=n)
        err.append(abs(float(ig.values[parts.graph.src == 0].double().sum()) - total))
    assert err[2] < err[1] < err[0]
    assert err[2] < 0.06 * abs(total) and abs(total) > 1e-3


def test_eap_ig_activations_runs_one_pass_per_layer_and_matches_eap_at_one_step():
    model = tiny_llama()
    parts = C.Parts(interp.attach(model))
    clean, corr = pair()
    act = C.eap(parts, clean, corr, metric, method="eap-ig-act", steps=4)
    assert act.attrs["forward_backward_passes"] == parts.L + 1
    # with 1 step (alpha = 1) the interpolated layer sits at its clean value; the input layer's pass then
    # equals EAP-IG over the inputs with 1 step
    one = C.eap(parts, clean, corr, metric, method="eap-ig-act", steps=1)
    ig1 = C.eap(parts, clean, corr, metric, method="eap-ig", steps=1)
    inp = parts.graph.src == 0
    assert (one.values[inp] - ig1.values[inp]).abs().max() <= 1e-5
    assert torch.isfinite(act.values).all() and act.values.abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# exact edge patching and circuits
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: tiny_gpt2(n_layer=3, vocab=VOCAB), lambda: tiny_llama(layers=3)],
                         ids=["gpt2", "gqa-llama"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_edge_patching_equals_a_per_edge_plain_hook_loop(make, direction):
    model = make()
    parts = C.Parts(interp.attach(model))
    clean, corr = pair(b=2, T=6)
    got = C.edge_patching(parts, clean, corr, metric, direction=direction, progress=False)
    base, source = (corr, clean) if direction == "denoise" else (clean, corr)
    want = ref_edge_loop(model, parts.graph, base, source)
    assert got.shape == (parts.graph.n_edges,)
    assert (got.values - want).abs().max() <= 1e-5 and want.abs().max() > 1e-3
    # rows of receivers in layer l started at block l: fewer forward equivalents than one forward per edge
    assert got.attrs["forward_equivalents"] < 0.8 * parts.graph.n_edges


def test_circuit_evaluation_full_empty_and_single_edges():
    model = tiny_llama()
    parts = C.Parts(interp.attach(model))
    clean, corr = pair()
    E = parts.graph.n_edges
    pick = [0, 7, E // 2, E - 1]
    circuits = [torch.ones(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool)]
    for e in pick:
        c = torch.ones(E, dtype=torch.bool)
        c[e] = False
        circuits.append(c)
    vals, base = C.evaluate(parts, clean, corr, metric, circuits, progress=False)
    with torch.no_grad():
        m_clean, m_corr = metric(model(clean).logits), metric(model(corr).logits)
    assert (vals[0] - m_clean).abs().max() <= 1e-5 and (base - m_clean).abs().max() <= 1e-5
    assert (vals[1] - m_corr).abs().max() <= 1e-5  # every edge ablated = the corrupted run
    noise = ref_edge_loop(model, parts.graph, clean, corr, pick)
    assert ((vals[2:].mean(1) - m_clean.mean()) - noise).abs().max() <= 1e-5


@pytest.mark.parametrize("make", [lambda: tiny_gpt2(n_layer=3, vocab=VOCAB), lambda: tiny_llama(layers=3)],
                         ids=["gpt2", "gqa-llama"])
def test_path_patching_equals_nested_plain_hooks(make):
    """One sender into receivers of two layers: the later receiver sees the earlier one's change plus the
    sender's swap, as with both plain-hook patches applied in one forward."""
    model = make()
    parts = C.Parts(interp.attach(model))
    g = parts.graph
    clean, corr = pair()
    kv = "kv1" if parts.KV != parts.H else "h1"
    receivers = ["a1.h2<q>", f"a2.{kv}<v>", "m2"]
    got = C.path_patching(parts, clean, corr, metric, "a0.h3", receivers)
    ref = Ref(model)
    delta = (ref.capture(corr) - ref.capture(clean))[g.senders.index("a0.h3")]
    rs = [g.receivers[int(g.dst[g.index(f"a0.h3->{r}")])] for r in receivers]
    with torch.no_grad():
        m_clean = float(metric(model(clean).logits).mean())
        with ref.add_at(rs[0], delta), ref.add_at(rs[1], delta), ref.add_at(rs[2], delta):
            want = float(metric(model(clean).logits).mean()) - m_clean
    assert abs(got - want) <= 1e-5 and abs(want) > 1e-4
    one = C.path_patching(parts, clean, corr, metric, "a0.h3", ["m2"])
    single = C.edge_patching(parts, clean, corr, metric, direction="noise", edges=[g.index("a0.h3->m2")],
                             progress=False)
    assert abs(one - float(single.values[0])) <= 1e-5


def test_mean_ablation_of_identical_references_equals_patching_from_them():
    model = tiny_gpt2(n_layer=2, vocab=VOCAB)
    parts = C.Parts(interp.attach(model))
    clean, corr = pair()
    ref = corr[:1].repeat(3, 1)
    keep = C.top_k(torch.randn(parts.graph.n_edges, generator=torch.Generator().manual_seed(0)), 20)
    mean, _ = C.evaluate(parts, clean, corr, metric, [keep], ablation="mean", reference=ref, progress=False)
    patch, _ = C.evaluate(parts, clean, corr[:1].repeat(2, 1), metric, [keep], progress=False)
    assert (mean - patch).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="reference"):
        C.evaluate(parts, clean, corr, metric, [keep], ablation="mean")


# ------------------------------------------------------------------------------------------------
# ground truth: a planted circuit
# ------------------------------------------------------------------------------------------------

LIVE = {"a0.h1", "a1.h2", "m1"}


def planted_model():
    """GPT-2 whose heads other than a0.h1 and a1.h2 and whose MLP 0 write exactly zero into the stream."""
    model = tiny_gpt2(n_layer=2, n_embd=32, n_head=4, vocab=VOCAB, seed=3)
    dh = 8
    with torch.no_grad():
        for l, live in ((0, 1), (1, 2)):
            W = model.transformer.h[l].attn.c_proj.weight  # [H*dh, d]
            for h in range(4):
                if h != live:
                    W[h * dh:(h + 1) * dh] = 0
        model.transformer.h[0].mlp.c_proj.weight.zero_()
        model.transformer.h[0].mlp.c_proj.bias.zero_()
    return model


def test_planted_circuit_is_recovered():
    model = planted_model()
    parts = C.Parts(interp.attach(model))
    g = parts.graph
    clean, corr = pair(b=4, T=6)
    corr[:, -1] = (clean[:, -1] + 1) % VOCAB  # the input then differs where the last layer reads it too
    live_nodes = {"input"} | LIVE
    planted = torch.tensor([g.senders[int(s)] in live_nodes and
                            any(n in live_nodes | {"logits"} for n in _dst_nodes(g.receivers[int(r)]))
                            for s, r in zip(g.src, g.dst)])
    assert int(planted.sum()) == 16  # input->{a0.h1 qkv, a1.h2 qkv, m1, logits}, a0.h1->{a1.h2 qkv, m1, logits}, ...
    exact = C.edge_patching(parts, clean, corr, metric, progress=False)
    assert exact.values[~planted].abs().max() == 0  # provably irrelevant: exactly no effect
    assert exact.values[planted].abs().min() > 0
    assert C.auroc(exact.values, planted) == 1.0
    ig = C.eap(parts, clean, corr, metric, method="eap-ig", steps=5)
    assert C.auroc(ig.values, planted) >= 0.95
    vals, base = C.evaluate(parts, clean, corr, metric, [planted, torch.zeros_like(planted)], progress=False)
    f = (vals[0].mean() - vals[1].mean()) / (base.mean() - vals[1].mean())
    assert abs(float(f) - 1.0) <= 1e-4
    # and dropping a planted edge with a real effect loses faithfulness
    worst = int(torch.argmax(exact.values.abs()))
    minus = planted.clone()
    minus[worst] = False
    v2, _ = C.evaluate(parts, clean, corr, metric, [minus], progress=False)
    assert abs(float((v2[0].mean() - vals[1].mean()) / (base.mean() - vals[1].mean())) - 1.0) > 1e-3


def _dst_nodes(r):
    if r.kind == "logits":
        return ["logits"]
    return [f"m{r.layer}"] if r.kind == "mlp" else [f"a{r.layer}.h{r.head}"]


# ------------------------------------------------------------------------------------------------
# selection, faithfulness, files, tasks, figures
# ------------------------------------------------------------------------------------------------

def test_area_top_k_greedy_and_rank_helpers():
    cpr, cmd = C.area([0.5], [0.5])
    assert cpr == pytest.approx(0.5) and cmd == pytest.approx(0.5)
    cpr, cmd = C.area([0.25, 0.5], [1.0, 1.0])
    assert cpr == pytest.approx(1 - 0.125) and cmd == pytest.approx(0.125)
    g = C.build_graph(2, 2, 2)
    s = torch.zeros(g.n_edges)
    s[g.index("a0.h0->a1.h1<q>")] = 10.0   # not connected to the logits until a1.h1 is in the circuit
    s[g.index("a1.h1->logits")] = 1.0
    s[g.index("m0->logits")] = 2.0
    assert C.top_k(s, 1).nonzero().flatten().tolist() == [g.index("a0.h0->a1.h1<q>")]
    chosen = C.greedy(g, s, 2).nonzero().flatten().tolist()
    assert chosen == sorted([g.index("m0->logits"), g.index("a1.h1->logits")])
    three = C.greedy(g, s, 3)
    assert three[g.index("a0.h0->a1.h1<q>")]
    assert C.auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, False])) == 1.0
    assert C.spearman(torch.arange(5.0), torch.arange(5.0) ** 3) == pytest.approx(1.0)
    assert C.top_overlap(torch.tensor([3.0, 2, 1, 0]), torch.tensor([0.0, 2, 3, 1]), 2) == 0.5


def test_faithfulness_curve_and_mib_file_round_trip(tmp_path):
    model = tiny_gpt2(n_layer=2, vocab=VOCAB)
    parts = C.Parts(interp.attach(model))
    clean, corr = pair(b=3)
    scores = C.edge_patching(parts, clean, corr, metric, progress=False)
    curve = C.faithfulness(parts, clean, corr, metric, scores, budgets=(0.05, 0.2, 0.5), progress=False)
    assert curve.shape == (3,) and {"CPR", "CMD", "m_full", "m_empty"} <= set(curve.attrs)
    # the curve's points are evaluate() of the top-k circuits, normalised
    k = curve.attrs["edges_kept"][1]
    v, base = C.evaluate(parts, clean, corr, metric, [C.top_k(scores, k), torch.zeros(parts.graph.n_edges,
                                                                                        dtype=torch.bool)],
                         progress=False)
    f = (v[0].mean() - v[1].mean()) / (base.mean() - v[1].mean())
    assert float(curve.values[1]) == pytest.approx(float(f), abs=1e-5)
    keep = C.top_k(scores, k)
    path = C.save_circuit(tmp_path / "c.json", parts.graph, scores, keep)
    d = json.loads(path.read_text())
    assert set(d) == {"cfg", "nodes", "edges"} and d["edges"]["m1->logits"].keys() == {"score", "in_graph"}
    s2, k2 = C.load_circuit(path, parts.graph)
    assert torch.equal(k2, keep) and (s2 - scores.values).abs().max() <= 1e-6
    other = C.Parts(interp.attach(tiny_gpt2(n_layer=3, vocab=VOCAB))).graph
    with pytest.raises(C.CircuitFileError, match="n_layers"):
        C.load_circuit(path, other)
    r = curve.save(tmp_path / "curve")
    assert interp.Result.load(r).attrs["CPR"] == pytest.approx(curve.attrs["CPR"])


def test_tasks_tokenise_and_refuse_clearly(gpt2_tokenizer):
    for name in ("ioi", "capitals", "greater_than", "agreement"):
        t = C.fitting(C.TASKS[name](n=12), gpt2_tokenizer)
        assert len(t) >= 2
        lens = {len(gpt2_tokenizer(x)["input_ids"]) for x in t.clean + t.corrupted}
        assert len(lens) == 1
        assert len(t.ids["answer"]) == len(t)
    bad = C.Task("x", ["The capital of France is"], ["The capital of Czechoslovakia is"], [" Paris"], [" Rome"])
    with pytest.raises(C.TaskTokenError, match="pair 0"):
        bad.check(gpt2_tokenizer)
    bad = C.Task("x", ["The capital of France is"], ["The capital of Japan is"], [" Ouagadougou"], [" Rome"])
    with pytest.raises(C.TaskTokenError, match="single-token"):
        bad.check(gpt2_tokenizer)


def test_task_metric_picks_each_items_answer(gpt2_tokenizer):
    t = C.fitting(C.capitals(n=6), gpt2_tokenizer)
    m = t.metric()
    logits = torch.randn(2 * len(t), 1, 50257)  # two grid rows of the items
    want = torch.stack([logits[i, -1, t.ids["answer"][i % len(t)]] - logits[i, -1, t.ids["foil"][i % len(t)]]
                        for i in range(2 * len(t))])
    assert torch.allclose(m(logits), want)
    assert torch.allclose(m.on_columns(logits[:, :, list(m.columns)]), want)


def test_figures(tmp_path):
    model = tiny_gpt2(n_layer=2, vocab=VOCAB)
    parts = C.Parts(interp.attach(model))
    clean, corr = pair()
    s = C.eap(parts, clean, corr, metric)
    p = C.plot_circuit(parts.graph, s, C.top_k(s, 15), tmp_path / "g.png", "tiny GPT-2, EAP, logit diff")
    curve = C.faithfulness(parts, clean, corr, metric, s, budgets=(0.1, 0.5), progress=False)
    q = C.plot_faithfulness({"EAP": curve}, tmp_path / "f.png", "tiny GPT-2")
    h = C.score_matrix(parts.graph, s, n=8)
    assert h.shape == (8, 8)
    r = h.plot(tmp_path / "h.png", title="edge scores")
    for f in (p, q, r):
        assert f.stat().st_size > 5000
