"""The family matrix: interp.check passes on a tiny random-weight model of every family interp claims.

check() verifies the site identities (residual chain and sums, attn.out from attn.z, logits from the
final norm), that a patch at every site kind equals a plain torch hook on the module the adapter names,
and that grids with every shortcut on equal per-cell full forwards, at a prompt longer than every
sliding window, batch 1 and 3 (see interp/check.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interp
from interp.check import check
from interp.errors import UnknownSiteError

sys.path.insert(0, str(Path(__file__).parent))
from parity_zoo import (  # noqa: E402
    build,
    build_denoiser,
    encoder_configs,
    lm_configs,
    text_encoder_configs,
)

# Families whose blocks cannot be replayed alone exactly: their grids run full forwards (exact) and say so.
# Bloom: the ALiBi bias arrives as [batch * heads, 1, pos], which a batch-expanded replay cannot recover.
FULL_FORWARD_GRIDS = {"bloom"}
# Families whose positional packs are refused (layer-prefix replay still runs): DeepSeek-V3's attention
# (multi-head latent attention) does not go through a key/value cache call the packs can prepend to.
NO_PACKS = {"deepseek_v3", "mamba", "mamba2"}
# Parallel blocks (attention and MLP both read resid_pre): no resid_mid.
PARALLEL = {"gpt_neox", "gptj", "falcon", "falcon_new", "phi", "cohere"}
# State-space models (no attention, no key/value cache: packs refused, layer-prefix replay runs).
SSM = {"mamba", "mamba2"}


def _shortcuts(report) -> set[str]:
    return {row.kind.split("(")[1].rstrip(")") for row in report.rows if row.kind.startswith("grid")}


@pytest.mark.parametrize("family", list(lm_configs()))
def test_causal_lm_family_passes_check(family):
    lm = interp.attach(build(family))
    assert lm.family == "hf_lm"
    report = check(lm)
    assert report.ok, f"{family}:\n{report.table()}"
    assert report.max_diff <= 1e-5
    kinds = {row.kind for row in report.rows}
    if family in SSM:
        assert {"sum resid_post=resid_pre+mixer.out", "patch mixer.out", "head output=tail(resid_post[L-1])"} <= kinds
        assert _shortcuts(report) == {"prefix"}
        return
    # the identities that define the site names ran, not only some of them
    if lm.adapter.final:  # post-LN OPT has no final norm: its head reads the last resid_post
        assert "head logits=head(final)" in kinds, sorted(kinds)
    assert {"chain resid_post[l]=resid_pre[l+1]", "attn.out=o_proj(attn.z)",
            "head output=tail(resid_post[L-1])", "patch resid_pre", "patch attn.out", "patch attn.z",
            "patch resid_post", "patch logits"} <= kinds, sorted(kinds)
    assert any(k.startswith("sum resid_post") for k in kinds), sorted(kinds)
    assert "patch mlp.out" in kinds
    if family not in PARALLEL:
        assert {"sum resid_mid=resid_pre+attn.out", "patch resid_mid"} <= kinds, sorted(kinds)
    used = _shortcuts(report)
    details = " ".join(r.detail for r in report.rows if r.kind.startswith("grid"))
    if family in FULL_FORWARD_GRIDS:
        assert used == {"full forwards"} and "prefix_reuse refused: replaying blocks" in details
    elif family in NO_PACKS:
        assert used == {"prefix"} and "positional_reuse refused" in details
    else:
        assert used == {"prefix+packs"}, used  # the fast paths really ran, and were exact
    assert report.settings["seq_len"] > (getattr(lm.model.config, "sliding_window", None) or 0)


@pytest.mark.parametrize("family", list(encoder_configs()))
def test_encoder_family_passes_check(family):
    lm = interp.attach(build(family))
    assert lm.family == "hf_encoder"
    report = check(lm)
    assert report.ok, f"{family}:\n{report.table()}"
    kinds = {row.kind for row in report.rows}
    assert {"sum resid_mid=resid_pre+attn.out", "sum resid_post=resid_mid+mlp.out", "attn.out=o_proj(attn.z)",
            "patch resid_mid", "patch mlp.out"} <= kinds


def test_check_catches_a_site_that_points_at_the_wrong_tensor():
    """Break one site (resid_mid at the raw attention output, the old post-norm defect): check fails there."""
    from dataclasses import replace

    lm = interp.attach(build("olmo2"))
    table = lm.adapter.site_table()
    s = table._sites["blocks.0.resid_mid"]
    table._sites["blocks.0.resid_mid"] = replace(s, module="model.layers.0.post_attention_layernorm")
    report = check(lm, grids=False)
    assert not report.ok
    bad = {r.kind for r in report.failures()}
    assert "sum resid_mid=resid_pre+attn.out" in bad


def test_check_catches_a_wrong_grid_shortcut(monkeypatch):
    """Restore the old defect (every block of a pack gets the start block's mask, validated only from
    block L/2): on Gemma 2 with a prompt longer than the window, check's grid rows fail."""
    import interp.engine as engine
    import interp.prefix as prefix

    real, first = prefix._mask, {}

    def stale(pack, base_mask, dtype, dev):
        return first.setdefault(id(pack), real(pack, base_mask, dtype, dev))
    monkeypatch.setattr(prefix, "_mask", stale)
    monkeypatch.setattr(engine, "replay_starts", lambda ad, block_in, lowest=1: [len(ad.block_paths) // 2])
    report = check(interp.attach(build("gemma2")), batches=(1,))
    assert not report.ok and any(r.kind.startswith("grid") for r in report.failures()), report.table()


@pytest.mark.parametrize("family,site,needle", [
    ("gpt2", "blocks.0.attn.k", "module:transformer.h.0.attn"),
    ("phi", "blocks.0.resid_mid", "parallel block"),
    ("mamba", "blocks.0.attn.out", "state-space block"),
])
def test_missing_sites_say_what_was_looked_for_and_the_raw_path(family, site, needle):
    lm = interp.attach(build(family))
    with pytest.raises(UnknownSiteError) as e:
        lm.site(site)
    msg = str(e.value)
    assert needle in msg and site in msg and "module:" in msg


def test_one_kv_head_patches_back():
    """MQA / Gemma 1 (one key/value head): a captured attn.k / attn.v patches back exactly."""
    lm = interp.attach(build("gemma"))
    ids = torch.randint(3, 96, (3, 12))
    other = torch.randint(3, 96, (3, 12))
    for name in ("blocks.0.attn.k", "blocks.1.attn.v"):
        src = lm.capture(other, name)[name]
        assert src.shape == (3, 12, 1, 16)
        got = lm.run(ids, [interp.Patch(name, source=src)], capture=name).cache[name]
        torch.testing.assert_close(got, src, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(text_encoder_configs()))
def test_text_encoder_family_passes_check(family):
    lm = interp.attach(build(family))
    assert lm.family == "text_encoder"
    report = check(lm)
    assert report.ok, f"{family}:\n{report.table()}"
    kinds = {row.kind for row in report.rows}
    assert {"sum resid_mid=resid_pre+attn.out", "sum resid_post=resid_mid+mlp.out", "attn.out=o_proj(attn.z)",
            "patch resid_mid"} <= kinds, sorted(kinds)


DENOISER_FAMILIES = {"unet2d_condition": "unet", "unet2d": "unet", "sd3": "dit", "flux": "dit", "pixart": "dit",
                     "sana": "dit", "hunyuan_dit": "dit", "auraflow": "dit", "lumina2": "dit", "cogvideox": "dit",
                     "wan": "dit", "ltx_video": "dit"}


@pytest.mark.parametrize("family", list(DENOISER_FAMILIES))
def test_denoiser_family_passes_check(family):
    """Every named site of the denoiser, patched whole from another call at batch 3, equals a plain torch hook
    doing the same on the module it names (this includes the [batch, d] timestep embeddings)."""
    model, inputs = build_denoiser(family)
    lm = interp.attach(model)
    assert lm.family == DENOISER_FAMILIES[family]
    report = check(lm, inputs(3, 0), other=inputs(3, 5))
    assert report.ok, f"{family}:\n{report.table()}"
    kinds = {row.kind for row in report.rows}
    assert "patch time_embed" in kinds and sum(r.n for r in report.rows) >= 8
    if family not in ("unet2d_condition", "unet2d", "sd3", "flux"):  # named by module probing
        assert {"patch resid_pre", "patch attn.out", "patch attn.z", "patch ff.out", "patch final"} <= kinds, kinds


def test_dit_in_a_pipeline_gets_the_same_names():
    """The probed DiT names are what a pipeline prefixes with its component name (pipeline.py uses dit_sites)."""
    from interp.adapters.dit import dit_sites

    model, _ = build_denoiser("pixart")
    alone = [s.name for s in interp.attach(model).sites()]
    inside = [s.name for s in dit_sites(model, prefix="transformer.", module_prefix="transformer.")]
    assert alone == inside and "transformer.blocks.1.cross.k" in alone


def test_batch_d_site_patches_back_at_batch_3():
    """[batch, d] sites (timestep embeddings): a capture from batch 3 patches back item by item."""
    model, inputs = build_denoiser("unet2d_condition")
    lm = interp.attach(model)
    a, b = inputs(3, 0), inputs(3, 5)
    src = lm.capture(b, "unet.time_embed")["unet.time_embed"]
    assert src.shape[0] == 3 and src.dim() == 2
    got = lm.run(a, [interp.Patch("unet.time_embed", source=src)], capture="unet.time_embed").cache["unet.time_embed"]
    torch.testing.assert_close(got, src, rtol=0, atol=0)
    one = lm.run(a, [interp.Patch("unet.time_embed", source=src[1], where=interp.at(items=[0]))],
                 capture="unet.time_embed").cache["unet.time_embed"]
    torch.testing.assert_close(one[0], src[1], rtol=0, atol=0)
    torch.testing.assert_close(one[1:], lm.capture(a, "unet.time_embed")["unet.time_embed"][1:], rtol=0, atol=0)


@pytest.mark.parametrize("family,cls", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"),
                                        ("gpt_neox", "GPTNeoXForCausalLM")])
def test_canonical_sites_equal_transformer_lens_hooks_on_the_same_weights(family, cls):
    """The hf_lm adapter's canonical sites hold the tensors TransformerLens's hook points hold (a peer's
    definition of the same names), and check() passes on the TransformerLens bridge itself."""
    import copy

    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    model = build(family)
    bridge = build_bridge_from_module(copy.deepcopy(model), cls, hf_config=model.config)
    ours, peer = interp.attach(model), interp.attach(bridge)
    assert peer.family == "transformer_lens"
    ids = torch.randint(3, 96, (3, 24), generator=torch.Generator().manual_seed(0))
    names = [n for n in ours.site_names("blocks.*") if n.rsplit(".", 1)[-1] in ("resid_pre", "out", "resid_post")
             and n in set(peer.site_names())]
    assert len(names) >= 4 * 2
    a, b = ours.capture(ids, names), peer.capture(ids, names)
    for n in names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-5, msg=n)
    if family != "gpt_neox":
        assert check(peer, grids=False).ok


def test_physics_surrogate_passes_check():
    """The zoo's physics surrogate (pre-norm blocks): residual sums, attn.z -> attn.out, patch parity, grids."""
    from interp.zoo import physics as P

    torch.manual_seed(0)
    model = P.PhysicsSurrogate(d_model=16, n_heads=2, n_layers=2, d_mlp=32).eval()
    g = torch.Generator().manual_seed(0)

    def inputs(b):
        return (torch.randn(b, P.N_GRID, generator=g), torch.rand(b, generator=g) * 0.1, torch.rand(b, generator=g))
    lm = interp.attach(model)
    assert lm.family == "physics"
    report = check(lm, inputs(3), other=inputs(3))
    assert report.ok, report.table()
    kinds = {r.kind for r in report.rows}
    assert {"sum resid_mid=resid_pre+attn.out", "sum resid_post=resid_mid+mlp.out", "attn.out=o_proj(attn.z)",
            "patch attn.z", "patch resid_mid"} <= kinds, kinds
