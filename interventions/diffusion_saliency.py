"""Where a concept sits in the image: ConceptAttention for MMDiT denoisers and raw cross-attention maps.

    from interventions.diffusion_saliency import concept_attention, cross_attention, segmentation_scores
    maps = concept_attention(pipe, Sampling("a small red circle on the left, striped", steps=28), ["red", "circle"])
    maps.values          # [image, concept, h, w] on the denoiser's token grid (SD3 / Flux patches, UNet latent)

**ConceptAttention** (MMDiT: SD3 joint blocks, Flux double-stream blocks). Each concept word is encoded on its own
by the pipeline's text encoders and put through the denoiser's ``context_embedder``. In every joint block the
concept tokens go through the block's own text-stream modulation and projections (``norm1_context``,
``add_q/k/v_proj``) and attend to the image keys and to each other, but nothing attends *to* them, so the image
stream and the image itself are exactly those of the plain run (the maps are computed from the run's captured
image-stream tensors after it). The concepts then get their own residual update (``to_add_out``, ``ff_context``)
for the next block. The map of a block is the dot product of each image token's attention output with each
concept's attention output, both after their stream's output projection (``space="output"``, the published
choice) or before it (``space="value"``); blocks without a text output projection (SD3's last block) use the
value space. Per block and step the map is a softmax over the concepts (``softmax=True``), then averaged over the
chosen blocks and steps.

**Raw cross-attention** (MMDiT and UNet): the attention probability from each image query to the prompt's token
of the concept word (the mean over the word's tokens and over heads), averaged over the chosen blocks and steps.
On an MMDiT the softmax runs over the joint key set (image and text tokens), as in the model. UNet maps of the
lower resolutions are upsampled (bilinear) to the finest cross-attention grid before averaging.

Everything is captured through interp's engine (raw ``module:`` sites of the projections); no hooks are
registered here. ``image_saliency`` does the same for given images (e.g. renders with known masks): each is
noised to the given noise levels and denoised for one call per level.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import interp
from interp.adapters.pipeline import Sampling
from interp.errors import InterpError
from interp.results import Result

__all__ = ["concept_attention", "cross_attention", "image_saliency", "concept_embeddings", "segmentation_scores",
           "ConceptInputs", "SaliencyError"]

MMDIT = ("SD3Transformer2DModel", "FluxTransformer2DModel")


class SaliencyError(InterpError, ValueError):
    """A saliency request that cannot be served (unknown word, layer, or denoiser)."""


@dataclass
class ConceptInputs:
    """Concept words and their text-encoder states [concept, d_text] (what ``context_embedder`` takes)."""

    words: list[str]
    embeds: torch.Tensor


# ------------------------------------------------------------------------------------------------ helpers
def _denoiser(pipe) -> tuple[str, nn.Module]:
    for name in ("transformer", "unet"):
        den = getattr(pipe, name, None)
        if isinstance(den, nn.Module):
            return name, den
    raise SaliencyError(f"{type(pipe).__name__} has no transformer or unet; pass a diffusers text-to-image pipeline")


def _kind(den: nn.Module) -> str:
    name = type(den).__name__
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "UNet2DConditionModel":
        return "unet"
    raise SaliencyError(f"no saliency map for a {name} denoiser; supported: SD3Transformer2DModel, "
                        "FluxTransformer2DModel (ConceptAttention, cross-attention) and UNet2DConditionModel "
                        "(cross-attention)")


def _layers(n: int, layers) -> list[int]:
    out = list(range(n)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in out if not -n <= i < n]
    if bad or not out:
        raise SaliencyError(f"layers {layers!r} are out of range: this denoiser has {n} attention blocks (0..{n - 1})")
    return sorted({i % n for i in out})


def _cross_modules(den: nn.Module) -> list[str]:
    """UNet cross-attention modules (attn2 of every transformer block), in forward order (down, mid, up)."""
    names = [n for n, m in den.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)]
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (stage.get(n.split(".")[0], 3), names.index(n)))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:  # [B, N, D] -> [B, h, N, d]
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


def _qk_norm(attn: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply attn.<name> (a per-head q/k norm, or None) to [B, h, N, d]."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


# ------------------------------------------------------------------------------------------------ concepts
def concept_embeddings(pipe, words: Sequence[str]) -> ConceptInputs:
    """Encode every concept word on its own and keep its tokens' states (mean over a word's tokens).

    SD3 / UNet pipelines: the CLIP states the denoiser is conditioned on; Flux: the T5 states."""
    _, den = _denoiser(pipe)
    kind = _kind(den)
    words = [str(w) for w in words]
    if not words:
        raise SaliencyError("give at least one concept word")
    with torch.no_grad():
        if kind == "unet":
            embeds = pipe.encode_prompt(words, "cpu", 1, False)[0]
            tok = pipe.tokenizer
        elif kind == "sd3":
            embeds = pipe.encode_prompt(words, words, words, device="cpu", do_classifier_free_guidance=False)[0]
            tok = pipe.tokenizer
        else:
            embeds = pipe.encode_prompt(words, words, device="cpu")[0]
            tok = pipe.tokenizer_2
    rows = []
    for i, w in enumerate(words):
        ids = tok(w, add_special_tokens=False)["input_ids"]
        start = 1 if getattr(tok, "bos_token_id", None) is not None and kind != "flux" else 0
        if not ids or start + len(ids) > embeds.shape[1]:
            raise SaliencyError(f"concept {w!r} does not fit the text encoder's {embeds.shape[1]} positions")
        rows.append(embeds[i, start:start + len(ids)].mean(0))
    return ConceptInputs(words, torch.stack(rows).float())


def prompt_concepts(pipe, prompts: Sequence[str], words: Sequence[str]) -> ConceptInputs:
    """Concept states taken from each prompt's own encoding: [prompt, concept, d_text], the mean over a word's
    tokens in that prompt (every word must occur in every prompt). The concept stream that carries them is still
    separate from the run's text stream, so the image is unchanged."""
    _, den = _denoiser(pipe)
    kind = _kind(den)
    prompts, words = list(prompts), [str(w) for w in words]
    with torch.no_grad():
        if kind == "unet":
            raise SaliencyError("ConceptAttention needs a joint-attention (MMDiT) denoiser; use cross_attention")
        if kind == "sd3":
            embeds = pipe.encode_prompt(prompts, prompts, prompts, device="cpu", do_classifier_free_guidance=False)[0]
        else:
            embeds = pipe.encode_prompt(prompts, prompts, device="cpu")[0]
    pos = _check_words(pipe, kind, prompts, words)
    rows = [torch.stack([e[p].mean(0) for p in per]) for e, per in zip(embeds, pos)]
    return ConceptInputs(words, torch.stack(rows).float())


def word_positions(tokens: Sequence[str], word: str) -> list[int]:
    """Positions of `word`'s token(s) in one prompt's token strings (first occurrence)."""
    want = word.strip().lower()
    norm = [t.strip().lower() for t in tokens]
    if want in norm:
        return [norm.index(want)]
    for i in range(len(norm)):  # a word split into several tokens
        acc = ""
        for j in range(i, len(norm)):
            acc += norm[j]
            if acc == want:
                return list(range(i, j + 1))
            if not want.startswith(acc):
                break
    raise SaliencyError(f"the prompt has no token(s) for {word!r}; its tokens are {[t for t in tokens if t.strip()]}")


def _token_strings(tok, prompt: str) -> list[str]:
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True)["input_ids"]
    strip = lambda t: str(t).replace("</w>", "").replace("\u2581", "").replace("\u0120", "")  # noqa: E731
    return [strip(t) for t in tok.convert_ids_to_tokens(ids)]


def _context_tokens(pipe, kind: str, prompt: str) -> list[str]:
    """Token strings along the denoiser's text axis (SD3: CLIP tokens first; Flux: T5; UNet: CLIP)."""
    tok = pipe.tokenizer_2 if kind == "flux" else pipe.tokenizer
    return _token_strings(tok, prompt)


# ------------------------------------------------------------------------------------------------ capture
def _sites(den: nn.Module, kind: str, p: str, layers: list[int], need: Sequence[str]) -> dict:
    """Raw module sites for (layer, key): q/k/v image projections, tk text keys, out/z image attention output
    after/before to_out.0; plus temb (time embedding) and, on Flux, ids (the rotary position ids)."""
    out: dict = {}
    if kind == "unet":
        mods = _cross_modules(den)
        for i in layers:
            out[i, "q"] = f"module:{p}{mods[i]}.to_q"
            out[i, "tk"] = f"module:{p}{mods[i]}.to_k"
        return out
    for i in layers:
        a = f"module:{p}transformer_blocks.{i}.attn"
        names = {"q": f"{a}.to_q", "k": f"{a}.to_k", "v": f"{a}.to_v", "tk": f"{a}.add_k_proj",
                 "out": f"{a}.to_out.0", "z": f"{a}.to_out.0:input"}
        out.update({(i, key): names[key] for key in need})
    out["temb"] = f"module:{p}time_text_embed"
    if kind == "flux":
        out["ids"] = f"module:{p}pos_embed:input"
    return out


def _step_filter(steps, n: int) -> set[int]:
    if steps is None:
        return set(range(n))
    if isinstance(steps, tuple) and len(steps) == 2:
        lo, hi = steps
        if not 0 <= lo < hi <= n:
            raise SaliencyError(f"step window {steps!r} is out of range for a run of {n} steps")
        return set(range(lo, hi))
    chosen = {steps} if isinstance(steps, int) else set(steps)
    if not chosen or not all(0 <= s < n for s in chosen):
        raise SaliencyError(f"steps {sorted(chosen)} are out of range for a run of {n} steps (0..{n - 1})")
    return chosen


def _sampled_calls(pipe, spec: Sampling, sites: dict, steps) -> tuple[list[dict], torch.Tensor, list[int]]:
    """Run the pipeline once through the engine; per chosen denoiser call, {key: tensor of the cond rows}."""
    lm = interp.attach(pipe)
    den_name, _ = _denoiser(pipe)
    names = sorted(set(sites.values()))
    run = lm.run(spec, capture=names)
    log = run.output.calls.get(den_name, [])
    keep = _step_filter(steps, run.output.n_steps)
    calls, used = [], []
    for j, rec in enumerate(log):
        if rec["step"] not in keep or "cond" not in rec["branches"]:
            continue
        rows = rec["branches"]["cond"]
        item = {}
        for key, name in sites.items():
            t = run.cache[name]
            if run.cache.axes.get(name, ())[:1] != ("call",):
                t = t[None]
            item[key] = t[j] if key == "ids" else t[j][rows[0]:rows[-1] + 1]
        calls.append(item)
        used.append(rec["step"])
    if not calls:
        raise SaliencyError(f"no conditional denoiser call at steps {sorted(keep)}")
    return calls, run.output.images, used


# ------------------------------------------------------------------------------------------------ maps
def _image_qk(attn: nn.Module, kind: str, x: torch.Tensor, norm: str, rope) -> torch.Tensor:
    """Image-stream projection [B, P, D] -> [B, h, P, d] with the block's q/k norm (and Flux's rotary embedding)."""
    if kind == "flux":
        from diffusers.models.embeddings import apply_rotary_emb

        x = _qk_norm(attn, norm, x.unflatten(-1, (attn.heads, -1)))
        if rope is not None:
            x = apply_rotary_emb(x, rope, sequence_dim=1)
        return x.transpose(1, 2)
    return _qk_norm(attn, norm, _heads(x, attn.heads))


def _text_qkv(attn: nn.Module, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-stream q, k, v [B, h, C, d] of normed text-stream states [B, C, D] (Flux text ids are 0: no rotation)."""
    q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
    if kind == "flux":
        q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
        q, k = _qk_norm(attn, "norm_added_q", q), _qk_norm(attn, "norm_added_k", k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
    return _qk_norm(attn, "norm_added_q", q), _qk_norm(attn, "norm_added_k", k), v


def _flux_rope(den: nn.Module, ids: torch.Tensor, n_img: int):
    """The image tokens' rotary embedding (cos, sin) from the position ids the transformer was called with."""
    cos, sin = den.pos_embed(ids)
    return cos[-n_img:], sin[-n_img:]


def concept_stream(den: nn.Module, call: dict, concepts: torch.Tensor, upto: int):
    """ConceptAttention through the joint blocks 0..upto of one denoiser call.

    `call`: captured image-stream tensors of the call ((i, "k"), (i, "v"), "temb", Flux "ids");
    `concepts`: context-embedded concept states [C, D] or [B, C, D]. Yields, per block, (i, value-space concept
    attention output [B, C, D], output-space one (None without to_add_out), concept states after the block)."""
    kind = _kind(den)
    temb = call["temb"]
    c = concepts.expand(temb.shape[0], -1, -1) if concepts.dim() == 2 else concepts
    for i, blk in enumerate(den.transformer_blocks):
        if i > upto:
            return
        attn, pre_only = blk.attn, getattr(blk, "context_pre_only", False)
        if pre_only:
            normed, gates = blk.norm1_context(c, temb), None
        else:
            normed, *gates = blk.norm1_context(c, emb=temb)
        rope = _flux_rope(den, call["ids"], call[i, "k"].shape[1]) if kind == "flux" else None
        ik = _image_qk(attn, kind, call[i, "k"], "norm_k", rope)
        iv = call[i, "v"].unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        cq, ck, cv = _text_qkv(attn, kind, normed)
        o = F.scaled_dot_product_attention(cq, torch.cat([ik, ck], 2), torch.cat([iv, cv], 2))
        o = o.transpose(1, 2).flatten(2)
        proj = getattr(attn, "to_add_out", None)
        co = proj(o) if proj is not None and not pre_only else None
        if gates is not None and co is not None:
            g_msa, shift, scale, g_mlp = gates
            c = c + g_msa[:, None] * co
            h = blk.norm2_context(c) * (1 + scale[:, None]) + shift[:, None]
            c = c + g_mlp[:, None] * blk.ff_context(h)
        yield i, o, co, c


def _concept_call_maps(den, call, concepts, layers, space: str, softmax: bool) -> torch.Tensor:
    """[B, C, P] ConceptAttention map of one call, mean over `layers`."""
    maps = []
    for i, o, co, _ in concept_stream(den, call, concepts, max(layers)):
        if i not in layers:
            continue
        if space == "output" and co is not None:
            img, con = call[i, "out"], co
        else:
            img, con = call[i, "z"], o
        logits = torch.einsum("bpd,bcd->bcp", img.float(), con.float())
        maps.append(logits.softmax(1) if softmax else logits)
    return torch.stack(maps).mean(0)


def joint_probs(den: nn.Module, call: dict, i: int) -> torch.Tensor:
    """Attention probabilities [B, h, P, P + T] of block i's image queries over the joint keys (image, then text),
    from the captured projections: the block's q/k norms, Flux's rotary embedding and the 1/sqrt(d) scale."""
    kind = _kind(den)
    attn = den.transformer_blocks[i].attn
    n_img = call[i, "q"].shape[1]
    rope = _flux_rope(den, call["ids"], n_img) if kind == "flux" else None
    q = _image_qk(attn, kind, call[i, "q"], "norm_q", rope)
    ik = _image_qk(attn, kind, call[i, "k"], "norm_k", rope)
    tk = call[i, "tk"]
    if kind == "flux":  # [B, T, h, d] for Flux's norms; its text ids are 0 (no rotation)
        tk = _qk_norm(attn, "norm_added_k", tk.unflatten(-1, (attn.heads, -1))).transpose(1, 2)
    else:
        tk = _qk_norm(attn, "norm_added_k", _heads(tk, attn.heads))
    keys = torch.cat([ik, tk], 2)
    return (q.float() @ keys.float().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)


def _mmdit_cross_maps(den, call, positions: list[list[int]], layers) -> torch.Tensor:
    """[B, W, P] attention probability of image queries on each word's text tokens (joint softmax), mean
    over heads, the word's tokens and `layers`."""
    maps = []
    for i in layers:
        probs = joint_probs(den, call, i)
        txt = probs[..., call[i, "q"].shape[1]:].mean(1)  # [B, P, T]
        maps.append(torch.stack([txt[..., pos].mean(-1) for pos in positions], 1))
    return torch.stack(maps).mean(0)


def unet_probs(den: nn.Module, call: dict, i: int) -> torch.Tensor:
    """Cross-attention probabilities [B, h, P, T] of the i-th UNet cross-attention module (captured q and k)."""
    attn = den.get_submodule(_cross_modules(den)[i])
    q, k = _heads(call[i, "q"].float(), attn.heads), _heads(call[i, "tk"].float(), attn.heads)
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)


def _grid(n: int, aspect: float) -> tuple[int, int]:
    h = max(1, round(math.sqrt(n * aspect)))
    if n % h:
        raise SaliencyError(f"cannot lay {n} image tokens out on a grid of aspect {aspect:.2f}")
    return h, n // h


def _unet_cross_maps(den, call, positions: list[list[int]], layers, aspect: float) -> torch.Tensor:
    """[B, W, h, w] UNet cross-attention probability per word, each layer's map upsampled (bilinear) to the
    finest grid among `layers`, mean over heads, the word's tokens and layers."""
    n_max = max(call[i, "q"].shape[1] for i in layers)
    size = _grid(n_max, aspect)
    maps = []
    for i in layers:
        probs = unet_probs(den, call, i).mean(1)  # [B, P, T]
        m = torch.stack([probs[..., pos].mean(-1) for pos in positions], 1)
        m = m.unflatten(-1, _grid(m.shape[-1], aspect))
        maps.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else m)
    return torch.stack(maps).mean(0)


# ------------------------------------------------------------------------------------------------ public
def _n_layers(den: nn.Module, kind: str) -> int:
    return len(_cross_modules(den)) if kind == "unet" else len(den.transformer_blocks)


def _check_words(pipe, kind: str, prompts: Sequence[str], words: Sequence[str]) -> list[list[list[int]]]:
    """Per prompt, per word: token positions on the denoiser's text axis (every word must be in every prompt)."""
    return [[word_positions(_context_tokens(pipe, kind, p), w) for w in words] for p in prompts]


def _embedded_concepts(den: nn.Module, concepts: ConceptInputs) -> torch.Tensor:
    with torch.no_grad():
        return den.context_embedder(concepts.embeds.to(next(den.parameters()).dtype))


def _result(maps: torch.Tensor, prompts, words, method: str, attrs: dict) -> Result:
    return Result(maps, ("image", "concept", "y", "x"), {"image": list(prompts), "concept": list(words)},
                  {"method": method, "metric": f"{method} saliency", **attrs})


def _maps_of_calls(pipe, calls, method: str, words, layers, aspect: float, space="output", softmax=True,
                   concept_inputs: ConceptInputs | None = None, positions=None) -> torch.Tensor:
    """Mean over calls of the per-call maps -> [B, W, h, w]."""
    _, den = _denoiser(pipe)
    kind = _kind(den)
    total = None
    with torch.no_grad():
        emb = _embedded_concepts(den, concept_inputs) if method == "concept" else None
        for call in calls:
            if method == "concept":
                m = _concept_call_maps(den, call, emb, layers, space, softmax)
            elif kind == "unet":
                m = torch.stack([_unet_cross_maps(den, {k: (v[b:b + 1] if k != "ids" else v) for k, v in call.items()},
                                                  positions[b], layers, aspect)[0] for b in range(len(positions))])
            else:
                m = torch.stack([_mmdit_cross_maps(den, {k: (v[b:b + 1] if k != "ids" else v) for k, v in call.items()},
                                                   positions[b], layers)[0] for b in range(len(positions))])
            if m.dim() == 3:
                m = m.unflatten(-1, _grid(m.shape[-1], aspect))
            total = m if total is None else total + m
    return total / len(calls)


def concept_attention(pipe, spec: Sampling | str, concepts: Sequence[str], *, layers=None, steps=None,
                      space: str = "output", softmax: bool = True, source: str = "isolated") -> Result:
    """ConceptAttention maps [image, concept, y, x] of a sampling run on an MMDiT pipeline (SD3, Flux).

    source: "isolated" (each concept word encoded on its own, the published method) or "prompt" (the word's
    states in each prompt's own encoding; every concept must then occur in every prompt).
    layers: joint-block indices (default all); steps: step indices or a (start, stop) window (default all);
    space: "output" (after the output projections) or "value"; softmax: over the concepts per block and step."""
    _, den = _denoiser(pipe)
    kind = _kind(den)
    if kind == "unet":
        raise SaliencyError("ConceptAttention needs a joint-attention (MMDiT) denoiser; a UNet has no text stream "
                            "to send concept tokens through: use cross_attention")
    if space not in ("output", "value"):
        raise SaliencyError(f"space={space!r}: choose 'output' or 'value'")
    spec = Sampling(spec) if isinstance(spec, str) else spec
    if source not in ("isolated", "prompt"):
        raise SaliencyError(f"source={source!r}: choose 'isolated' (each word encoded alone) or 'prompt'")
    chosen = _layers(_n_layers(den, kind), layers)
    need = ("k", "v", "out", "z")  # z: value space, also where a block has no text output projection
    sites = _sites(den, kind, f"{_denoiser(pipe)[0]}.", list(range(max(chosen) + 1)), need)  # the stream needs all
    calls, images, used = _sampled_calls(pipe, spec, sites, steps)
    ci = concept_embeddings(pipe, concepts) if source == "isolated" else prompt_concepts(pipe, spec.prompts(), concepts)
    aspect = images.shape[-2] / images.shape[-1]
    maps = _maps_of_calls(pipe, calls, "concept", ci.words, chosen, aspect, space, softmax, ci)
    res = _result(maps, spec.prompts(), ci.words, "concept_attention",
                  {"layers": chosen, "steps": used, "space": space, "softmax": softmax, "source": source})
    res.images = images  # the sampled images [N, 3, H, W] in [0, 1] (not saved with the result)
    return res


def cross_attention(pipe, spec: Sampling | str, words: Sequence[str], *, layers=None, steps=None) -> Result:
    """Raw cross-attention maps [image, word, y, x] (image queries -> the prompt's tokens of each word) of a
    sampling run on an SD3, Flux or UNet pipeline; every word must occur in every prompt."""
    den_name, den = _denoiser(pipe)
    kind = _kind(den)
    spec = Sampling(spec) if isinstance(spec, str) else spec
    positions = _check_words(pipe, kind, spec.prompts(), words)
    chosen = _layers(_n_layers(den, kind), layers)
    sites = _sites(den, kind, f"{den_name}.", chosen, ("q", "k", "tk"))
    calls, images, used = _sampled_calls(pipe, spec, sites, steps)
    aspect = images.shape[-2] / images.shape[-1]
    maps = _maps_of_calls(pipe, calls, "cross", words, chosen, aspect, positions=positions)
    res = _result(maps, spec.prompts(), words, "cross_attention", {"layers": chosen, "steps": used})
    res.images = images  # the sampled images [N, 3, H, W] in [0, 1] (not saved with the result)
    return res


def _noised_calls(pipe, images: torch.Tensor, prompts: Sequence[str], sites: dict, sigmas: Sequence[float],
                  seed: int) -> list[dict]:
    """One engine run of the bare denoiser per noise level on the noised images; captured tensors per run."""
    _, den = _denoiser(pipe)
    kind = _kind(den)
    if kind == "flux":
        raise SaliencyError("image_saliency runs SD3 and UNet denoisers on given images; on Flux use "
                            "concept_attention / cross_attention on a sampling run")
    x0 = images.float() * 2 - 1 if images.min() >= 0 else images.float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kind == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(list(prompts), list(prompts), list(prompts), device="cpu",
                                                   do_classifier_free_guidance=False)
        else:
            emb = pipe.encode_prompt(list(prompts), "cpu", 1, False)[0]
    lm = interp.attach(den)
    names = sorted(set(sites.values()))
    calls = []
    for s in sigmas:
        if not 0.0 < s <= 1.0:
            raise SaliencyError(f"noise level {s} must be in (0, 1] (the fraction of the trajectory left)")
        noise = torch.randn(x0.shape, generator=gen)
        if kind == "sd3":
            x, t = (1 - s) * x0 + s * noise, torch.full((len(x0),), 1000.0 * s)
            inputs = {"hidden_states": x, "timestep": t, "encoder_hidden_states": emb, "pooled_projections": pooled}
        else:
            t = torch.full((len(x0),), min(int(round(s * pipe.scheduler.config.num_train_timesteps)), 999))
            inputs = {"sample": pipe.scheduler.add_noise(x0, noise, t), "timestep": t, "encoder_hidden_states": emb}
        run = lm.run(inputs, capture=names)
        calls.append({key: run.cache[name] for key, name in sites.items()})
    return calls


def image_saliency(pipe, images: torch.Tensor, prompts: Sequence[str], words: Sequence[str], *,
                   method: str = "concept", sigmas: Sequence[float] = (0.5,), seed: int = 0, layers=None,
                   space: str = "output", softmax: bool = True, source: str = "isolated") -> Result:
    """Saliency maps [image, word, y, x] of given images [N, 3, H, W] (in [0, 1] or [-1, 1]), each noised to every
    level in `sigmas` (flow: x = (1 - s) x0 + s noise; DDPM: timestep s * 1000) and denoised once; maps are
    averaged over the levels. method: "concept" (MMDiT only) or "cross" (every word must be in every prompt)."""
    den_name, den = _denoiser(pipe)
    kind = _kind(den)
    if method not in ("concept", "cross"):
        raise SaliencyError(f"method={method!r}: choose 'concept' or 'cross'")
    if method == "concept" and kind == "unet":
        raise SaliencyError("ConceptAttention needs a joint-attention (MMDiT) denoiser; use method='cross' on a UNet")
    if len(images) != len(prompts):
        raise SaliencyError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    chosen = _layers(_n_layers(den, kind), layers)
    if method == "concept":
        sites, positions, ci = _sites(den, kind, "", list(range(max(chosen) + 1)), ("k", "v", "out", "z")), None, \
            concept_embeddings(pipe, words) if source == "isolated" else prompt_concepts(pipe, prompts, words)
    else:
        sites, ci = _sites(den, kind, "", chosen, ("q", "k", "tk")), None
        positions = _check_words(pipe, kind, prompts, words)
    calls = _noised_calls(pipe, images, prompts, sites, sigmas, seed)
    aspect = images.shape[-2] / images.shape[-1]
    maps = _maps_of_calls(pipe, calls, method, list(words), chosen, aspect, space, softmax, ci, positions)
    name = "concept_attention" if method == "concept" else "cross_attention"
    return _result(maps, prompts, words, name, {"layers": chosen, "sigmas": list(sigmas), "space": space,
                                                 "softmax": softmax, "seed": seed, "source": source})


# ------------------------------------------------------------------------------------------------ scoring
def segmentation_scores(maps: torch.Tensor, masks: torch.Tensor, threshold: str = "mean") -> dict[str, torch.Tensor]:
    """Score saliency maps [N, h, w] against true boolean masks [N, H, W].

    Each map is upsampled to the mask grid (nearest: one token covers its patch of pixels) and binarised at its
    own mean ("mean") or at the midpoint of its range ("mid"). Returns per-image tensors: iou (foreground IoU),
    miou (mean of foreground and background IoU, the two-class convention of segmentation benchmarks),
    pointing (1 where the map's maximum lies inside the mask)."""
    maps = torch.as_tensor(maps).float()
    masks = torch.as_tensor(masks).bool()
    if maps.dim() != 3 or masks.dim() != 3 or len(maps) != len(masks):
        raise SaliencyError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must be [N, h, w] and [N, H, W]")
    up = F.interpolate(maps[:, None], size=masks.shape[-2:], mode="nearest")[:, 0]
    flat = up.flatten(1)
    if threshold == "mean":
        cut = flat.mean(1)
    elif threshold == "mid":
        cut = (flat.amax(1) + flat.amin(1)) / 2
    else:
        raise SaliencyError(f"threshold={threshold!r}: choose 'mean' or 'mid'")
    pred = up > cut[:, None, None]

    def iou(a, b):
        inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))

    fg, bg = iou(pred, masks), iou(~pred, ~masks)
    pointing = masks.flatten(1).gather(1, flat.argmax(1, keepdim=True))[:, 0].float()
    return {"iou": fg, "miou": (fg + bg) / 2, "pointing": pointing}
