"""Property tests of the engine: generated rows of ops checked against a plain-torch reference.

Each example draws a model (a tiny GPT-2 or a tiny GQA Llama), a batch of prompts of one token
length, and rows of ops (kind x site x positions / Tokens / Subject x items x heads). The reference
applies every op with a plain `register_forward_hook` / `register_forward_pre_hook` on the module,
written here from the ops' documented formulas, with its own module paths and its own position
resolver; `run`, `run_grid` (prefix reuse on and off, several chunkings, last-position logits or
all), `applied` sessions, the in-process shards of the distributed path and resumed sweeps must
agree with it. Inputs the reference cannot resolve (a token missing from an item, a selection that
is empty) must be refused with an InterpError by every path.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import interp
from interp import Ablate, Add, Noise, Patch, Project, Replace, Subject, Tokens, at
from interp.errors import InterpError

from ..conftest import tiny_gpt2

WORDS = [" cat", " dog", " sat", " on", " the", " mat", " red", " big"]  # one GPT-2 token each
PROPS = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def tiny_llama(vocab: int = 50257, seed: int = 0):
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


# site name -> (module path, "input"|"output", heads or None); written independently of interp's tables
def _paths(family: str, layer: int) -> dict[str, tuple[str, str, int | None]]:
    if family == "gpt2":
        h = f"transformer.h.{layer}"
        return {"resid_pre": (h, "input", None), "attn.out": (f"{h}.attn", "output", None),
                "attn.z": (f"{h}.attn.c_proj", "input", 4), "resid_mid": (f"{h}.ln_2", "input", None),
                "mlp.out": (f"{h}.mlp", "output", None), "resid_post": (h, "output", None),
                "embed": ("transformer.wte", "output", None)}
    h = f"model.layers.{layer}"
    return {"resid_pre": (h, "input", None), "attn.out": (f"{h}.self_attn", "output", None),
            "attn.z": (f"{h}.self_attn.o_proj", "input", 4), "attn.k": (f"{h}.self_attn.k_proj", "output", 2),
            "attn.v": (f"{h}.self_attn.v_proj", "output", 2),
            "resid_mid": (f"{h}.post_attention_layernorm", "input", None),
            "mlp.out": (f"{h}.mlp", "output", None), "resid_post": (h, "output", None),
            "embed": ("model.embed_tokens", "output", None)}


def site_name(kind: str, layer: int) -> str:
    return kind if kind == "embed" else f"blocks.{layer}.{kind}"


@pytest.fixture(scope="module")
def models(gpt2_tokenizer):
    out = {}
    for fam, m in (("gpt2", tiny_gpt2()), ("llama", tiny_llama())):
        m.tokenizer = gpt2_tokenizer
        out[fam] = (m, interp.attach(m))
    return out


# ---------------------------------------------------------------------------------------------
# the reference: positions and edits in plain torch
# ---------------------------------------------------------------------------------------------

class RefError(Exception):
    """The spec selects nothing or something the input does not have: every path must refuse it."""


def ref_positions(spec, tokens: list[str], T: int) -> list[int]:
    if spec is None:
        return list(range(T))
    if isinstance(spec, Tokens):
        hits = [i for i, t in enumerate(tokens) if t.strip() == spec.text.strip()]
        if not hits:
            raise RefError(spec)
        if spec.occurrence is None:
            return hits
        if not -len(hits) <= spec.occurrence < len(hits):
            raise RefError(spec)
        return [hits[spec.occurrence]]
    if isinstance(spec, Subject):
        full, starts, s = "".join(tokens), [], 0
        for t in tokens:
            starts.append(s)
            s += len(t)
        found, text = [], spec.text if spec.text in full else spec.text.strip()
        i = full.find(text)
        while i >= 0:
            found.append(i)
            i = full.find(text, i + 1)
        if not found or not -len(found) <= spec.occurrence < len(found):
            raise RefError(spec)
        a = found[spec.occurrence]
        pos = [j for j, (st_, t) in enumerate(zip(starts, tokens)) if st_ < a + len(text) and st_ + len(t) > a]
        return {"last": pos[-1:], "first": pos[:1], "all": pos}[spec.which]
    if isinstance(spec, slice):
        got = list(range(T))[spec]
    else:
        got = [p % T for p in ([spec] if isinstance(spec, int) else spec)]
    if not got:
        raise RefError(spec)
    return got


def ref_edit(x: torch.Tensor, op, per_item: list[list[int]], items: list[int], heads) -> torch.Tensor:
    """x: [B, T, *F] (heads split on per-head sites) edited out of place, one destination at a time."""
    x = x.clone()
    for i in items:
        for p in per_item[i]:
            for h in ([None] if heads is None else heads):
                dst = (i, p) if h is None else (i, p, h)
                x[dst] = _ref_row(op, x[dst].clone(), i, p, h, x.shape[2:])
    return x


def _ref_row(op, cur, i, p, h, feat):
    if isinstance(op, Patch):
        src = op.source
        if tuple(src.shape[-len(feat):]) != tuple(feat):  # merged-head source on a per-head site
            src = src.unflatten(-1, feat)
        if src.dim() == len(feat) + 1:
            src = src[None]
        s = src[i % src.shape[0], p] if h is None else src[i % src.shape[0], p, h]
        return s.clone() if op.alpha == 1 else (1 - op.alpha) * cur + op.alpha * s
    if isinstance(op, Add):
        v = op.vector.reshape(cur.shape)
        if op.norm == "relative":
            return cur + op.alpha * v * cur.norm() / v.norm()
        return cur + op.alpha * v
    if isinstance(op, Ablate):
        return torch.zeros_like(cur) if op.mode == "zero" else op.values[() if h is None else h].reshape(cur.shape)
    if isinstance(op, Project):
        L, R, mu = op.eraser["L"], op.eraser["R"], op.eraser["mu"]
        flat = cur.reshape(-1)
        return (flat - L @ (R @ (flat - mu))).reshape(cur.shape)
    raise AssertionError(op)


@contextlib.contextmanager
def ref_hooks(model, family: str, row, tokens: list[list[str]], T: int):
    """Plain torch hooks applying `row` = [(op, kind, layer)] to `model`; yields nothing."""
    by_mod: dict[tuple[str, str], list] = {}
    B = len(tokens)
    for op, kind, layer in row:
        path, io, n_heads = _paths(family, layer)[kind]
        w = op.where
        items = list(range(B)) if w.items is None else ([w.items] if isinstance(w.items, int) else list(w.items))
        per_item = [ref_positions(w.pos.spec, tokens[i], T) if i in items else [] for i in range(B)]
        heads = None if w.heads is None else ([w.heads] if isinstance(w.heads, int) else list(w.heads))
        by_mod.setdefault((path, io), []).append((op, per_item, items, heads, n_heads, kind))

    def edit(x, specs):
        for op, per_item, items, heads, n_heads, _ in specs:
            view = x if n_heads is None else x.unflatten(-1, (n_heads, -1))
            if isinstance(op, Replace):
                new = view.clone()
                for i in items:
                    pos = torch.tensor(per_item[i])
                    hs = slice(None) if heads is None else torch.tensor(heads)
                    sel = new[i, pos] if heads is None else new[i][pos][:, hs]
                    out = op.fn(sel[None])[0]
                    if heads is None:
                        new[i, pos] = out
                    else:
                        for a, p in enumerate(per_item[i]):
                            new[i, p, hs] = out[a]
            else:
                new = ref_edit(view, op, per_item, items, heads)
            x = new if n_heads is None else new.flatten(-2)
        return x

    handles = []
    for (path, io), specs in by_mod.items():
        mod = model.get_submodule(path)
        if io == "output":
            def hook(m, args, out, specs=specs):
                if isinstance(out, tuple):
                    return (edit(out[0], specs), *out[1:])
                return edit(out, specs)
            handles.append(mod.register_forward_hook(hook))
        else:
            def pre(m, args, kwargs, specs=specs):
                t = args[0] if args else kwargs["hidden_states"]
                new = edit(t, specs)
                if specs[0][5] == "resid_mid":  # the residual stream itself: every consumer sees the edit
                    with torch.no_grad():
                        t.copy_(new)
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


def ref_logits(model, family, ids, row, tokens):
    with torch.no_grad(), ref_hooks(model, family, row, tokens, ids.shape[1]):
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

@st.composite
def prompts(draw):
    B = draw(st.integers(1, 3))
    n = draw(st.integers(5, 8))
    return ["The" + "".join(draw(st.lists(st.sampled_from(WORDS), min_size=n, max_size=n))) for _ in range(B)]


@st.composite
def pos_spec(draw, tokens0: list[str], T: int):
    kind = draw(st.sampled_from(["none", "int", "neg", "list", "slice", "tokens", "subject"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(0, T - 1))
    if kind == "neg":
        return draw(st.integers(-T, -1))
    if kind == "list":
        ps = draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=3, unique=True))
        return [p - T if draw(st.booleans()) else p for p in ps]
    if kind == "slice":
        a = draw(st.one_of(st.none(), st.integers(-T, T - 1)))
        b = draw(st.one_of(st.none(), st.integers(-T, T)))
        return slice(a, b, draw(st.sampled_from([None, 1, 2])))
    word = draw(st.sampled_from(tokens0[1:]))
    if kind == "tokens":
        return Tokens(word, occurrence=draw(st.sampled_from([None, 0, -1, 1])))
    j = tokens0.index(word)
    k = draw(st.integers(1, 2))
    text = "".join(tokens0[j:j + k])
    which = draw(st.sampled_from(["last", "first", "all"]))
    return Subject(text, which=which, occurrence=draw(st.sampled_from([0, -1])))


SITES = {"gpt2": ["resid_pre", "attn.out", "attn.z", "resid_mid", "mlp.out", "resid_post", "embed"],
         "llama": ["resid_pre", "attn.out", "attn.z", "attn.k", "attn.v", "resid_mid", "mlp.out", "resid_post",
                   "embed"]}
HEADS = {"attn.z": 4, "attn.k": 2, "attn.v": 2}


@st.composite
def an_op(draw, family: str, tokens: list[list[str]], T: int, kinds=("patch", "add", "ablate", "project", "replace")):
    kind = draw(st.sampled_from(SITES[family]))
    layer = draw(st.integers(0, 1))
    B = len(tokens)
    n_heads = HEADS.get(kind)
    heads = None
    if n_heads is not None and draw(st.booleans()):
        heads = draw(st.lists(st.integers(0, n_heads - 1), min_size=1, max_size=n_heads, unique=True))
    items = None
    if B > 1 and draw(st.booleans()):
        items = draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True))
    where = at(pos=draw(pos_spec(tokens[0], T)), heads=heads, items=items)
    width = 32 if n_heads == 2 else 64  # GQA key/value projections are 2 x 32 wide
    d = width // n_heads if n_heads else width
    feat = (n_heads, d) if n_heads else (width,)
    row_f = d if heads is not None else width  # the row an Add / Project edits
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    name = site_name(kind, layer)
    op_kind = draw(st.sampled_from(list(kinds)))
    if op_kind == "patch":
        bs = draw(st.sampled_from(sorted({1, B})))
        shape = (bs, T, *feat) if draw(st.booleans()) or bs > 1 else (T, *feat)
        src = torch.randn(shape, generator=g)
        if n_heads and draw(st.booleans()):
            src = src.flatten(-2)  # merged-head source
        op = Patch(name, src, alpha=draw(st.sampled_from([1.0, 0.5])), where=where)
    elif op_kind == "add":
        op = Add(name, torch.randn(row_f, generator=g), alpha=draw(st.sampled_from([2.0, -1.5])),
                 norm=draw(st.sampled_from([None, "relative"])), where=where)
    elif op_kind == "ablate":
        mean = draw(st.booleans())
        op = Ablate(name, mode="mean", values=torch.randn(feat, generator=g), where=where) if mean else \
            Ablate(name, where=where)
    elif op_kind == "project":
        q, _ = torch.linalg.qr(torch.randn(row_f, 2, generator=g))
        op = Project(name, {"L": q, "R": q.T.contiguous(), "mu": torch.randn(row_f, generator=g)}, where=where)
    elif op_kind == "replace":
        op = Replace(name, lambda t: t * 0.5 + 1.0, where=where)
    else:
        op = Noise(name, std=0.7, seed=draw(st.integers(0, 99)), where=where)
    return op, kind, layer


def _describe(rows) -> str:
    return "; ".join(" + ".join(f"{type(o).__name__}({o.site}, pos={o.where.pos!r}, heads={o.where.heads}, "
                                f"items={o.where.items})" for o in r) for r in rows)


def _setup(models, family, texts):
    model, lm = models[family]
    tok = model.tokenizer
    ids = torch.tensor([tok(t)["input_ids"] for t in texts])
    tokens = [[tok.decode([int(i)]) for i in row] for row in ids]
    return model, lm, ids, tokens


def _expected(model, family, ids, row, tokens):
    """The reference logits, or RefError when the row must be refused."""
    try:
        return ref_logits(model, family, ids, row, tokens)
    except RefError as e:
        return e


# ---------------------------------------------------------------------------------------------
# the properties
# ---------------------------------------------------------------------------------------------

@PROPS
@given(data=st.data(), family=st.sampled_from(["gpt2", "llama"]), texts=prompts())
def test_run_and_session_match_plain_torch_hooks(models, data, family, texts):
    model, lm, ids, tokens = _setup(models, family, texts)
    T = ids.shape[1]
    row = data.draw(st.lists(an_op(family, tokens, T), min_size=1, max_size=3))
    ops = [op for op, _, _ in row]
    want = _expected(model, family, ids, row, tokens)
    if isinstance(want, RefError):
        with pytest.raises(InterpError):
            lm.run(texts, ops)
        return
    got = lm.run(texts, ops).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lm.applied(ops):
        in_session = model(input_ids=ids).logits
    torch.testing.assert_close(in_session, want, rtol=1e-5, atol=1e-5)
    assert interp.hook_count(model) == 0


def _metric(logits):
    return logits[:, -1, :200].float()


@PROPS
@given(data=st.data(), family=st.sampled_from(["gpt2", "llama"]), texts=prompts(),
       reuse=st.booleans(), chunk=st.sampled_from([1, 2, None]), last_only=st.booleans())
def test_run_grid_matches_plain_torch_under_every_shortcut_and_chunking(models, data, family, texts, reuse, chunk,
                                                                        last_only):
    model, lm, ids, tokens = _setup(models, family, texts)
    T = ids.shape[1]
    rows = data.draw(st.lists(st.lists(an_op(family, tokens, T), min_size=1, max_size=2), min_size=1, max_size=4))
    wants = [_expected(model, family, ids, r, tokens) for r in rows]
    grid_rows = [[op for op, _, _ in r] for r in rows]
    kw = dict(reuse_prefix=reuse, chunk_rows=chunk, last_only=last_only, progress=False)
    if any(isinstance(w, RefError) for w in wants):
        with pytest.raises(InterpError):
            lm.run_grid(texts, grid_rows, _metric, **kw)
        return
    g = lm.run_grid(texts, grid_rows, _metric, **kw)
    want = torch.stack([_metric(w) for w in wants])
    torch.testing.assert_close(g.values, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.base, _metric(ref_logits(model, family, ids, [], tokens)), rtol=1e-5, atol=1e-5)
    assert interp.hook_count(model) == 0


@PROPS
@given(data=st.data(), family=st.sampled_from(["gpt2", "llama"]), texts=prompts())
def test_noise_and_every_op_agree_between_run_grid_and_session(models, data, family, texts):
    """Seeded noise has no plain-torch formula here: run, grid and session must give one answer."""
    model, lm, ids, tokens = _setup(models, family, texts)
    T = ids.shape[1]
    kinds = ("noise", "patch", "add", "ablate", "replace")
    rows = data.draw(st.lists(st.lists(an_op(family, tokens, T, kinds), min_size=1, max_size=2), min_size=1,
                              max_size=3))
    if any(isinstance(_expected(model, family, ids, [(o, k, l) for o, k, l in r if not isinstance(o, Noise)], tokens),
                      RefError) for r in rows):
        return  # refusals are covered above
    grid_rows = [[op for op, _, _ in r] for r in rows]
    note(_describe(grid_rows))
    try:
        per_run = torch.stack([_metric(lm.run(texts, r).logits) for r in grid_rows])
    except InterpError:  # only a noise op with an empty selection can be refused here
        with pytest.raises(InterpError):
            lm.run_grid(texts, grid_rows, _metric, progress=False)
        return
    for reuse in (True, False):
        g = lm.run_grid(texts, grid_rows, _metric, reuse_prefix=reuse, progress=False)
        torch.testing.assert_close(g.values, per_run, rtol=1e-4, atol=1e-4)
    for r, want in zip(grid_rows, per_run):
        with torch.no_grad(), lm.applied(r):
            torch.testing.assert_close(_metric(model(input_ids=ids).logits), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), family=st.sampled_from(["gpt2", "llama"]), texts=prompts(), world=st.integers(2, 3))
def test_distributed_shards_and_resumed_sweeps_match_plain_torch(models, data, family, texts, world, tmp_path_factory):
    from interp.distributed import _row_cost, _Shard

    model, lm, ids, tokens = _setup(models, family, texts)
    T = ids.shape[1]
    rows = data.draw(st.lists(st.lists(an_op(family, tokens, T), min_size=1, max_size=2), min_size=2, max_size=5))
    wants = [_expected(model, family, ids, r, tokens) for r in rows]
    if any(isinstance(w, RefError) for w in wants):
        return
    grid_rows = [[op for op, _, _ in r] for r in rows]
    want = torch.stack([_metric(w) for w in wants])
    parts, owners = [], []
    for rank in range(world):
        shard = _Shard(rank, world, _row_cost(lm.engine, grid_rows), None)
        parts.append(lm.engine.run_grid(texts, grid_rows, _metric, progress=False, chunk_rows=1,
                                        chunk_hook=shard).values)
        owners.append(shard.owner)
    assert all(o == owners[0] for o in owners) and sorted(owners[0]) == list(range(len(rows)))
    merged = torch.stack([parts[owners[0][r]][r] for r in range(len(rows))])
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
    folder = tmp_path_factory.mktemp("resume")
    first = lm.run_grid(texts, grid_rows, _metric, progress=False, chunk_rows=1, resume_dir=folder)
    again = lm.run_grid(texts, grid_rows, _metric, progress=False, chunk_rows=1, resume_dir=folder)
    torch.testing.assert_close(first.values, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(again.values, first.values)


def test_generated_positions_in_a_single_run_are_refused_with_a_clear_error(models):
    model, lm = models["gpt2"]
    for run in (lambda ops: lm.run("The cat sat", ops), lambda ops: lm.run_grid("The cat sat", [ops], progress=False)):
        with pytest.raises(InterpError, match="generated"):
            run([Add("blocks.0.resid_pre", torch.ones(64), where=at(pos="generated"))])
    assert interp.hook_count(model) == 0
