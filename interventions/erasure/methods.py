"""Erasure methods on diffusers pipelines. Each returns an `Edit` (new weights), applied with
`edit.apply(pipe)` or written to disk with interventions.checkpoint.

- uce / time / locoedit: the ridge solve on the UNet's cross-attention to_k / to_v (all layers, or a
  window of consecutive ones for LocoEdit); keys are the to_k / to_v inputs captured through the engine.
- quickfix (Diff-QuickFix): the ridge solve on text-encoder layer 0's self_attn.out_proj.
- context: SD3 / Flux `context_embedder` (+ the pooled text projection `time_text_embed.text_embedder.linear_1`).
- leace: a LEACE eraser of "concept vs rest" at the cross-attention inputs, folded into every to_k / to_v
  (or fitted on text-encoder layer 0's out_proj output and folded into it).
- hirm: fine-tune only the first text-encoder block (see hirm.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .core import Concept, Edit, capture, edit_start, linear_modules, tokenize_like_pipeline
from .leace import LeaceFitter, fold_weights
from .ridge import ridge_solve

METHODS = ("uce", "time", "locoedit", "quickfix", "context", "leace", "hirm")
DEFAULT_LAM = {"uce": 0.5, "time": 0.1, "locoedit": 0.5, "quickfix": 0.01, "context": 0.5}
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


# ---------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------

def _device(pipe) -> torch.device:
    for name in ("unet", "transformer", "text_encoder"):
        m = getattr(pipe, name, None)
        if isinstance(m, nn.Module):
            return next(m.parameters()).device
    return torch.device("cpu")


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Paths of the UNet's cross-attention modules (`...attn2`) in forward order (down, mid, up)."""
    names = [n[: -len(".to_k")] for n in linear_modules(unet, r"attn2\.to_k$")]
    if not names:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers (modules named '*.attn2.to_k')")
    return sorted(names, key=lambda n: (_BLOCK_ORDER.get(n.split(".")[0], 3), names.index(n)))


def select_layers(all_layers: list[str], layers) -> list[str]:
    """None -> all; ints index the forward-ordered list; strings name layers; a range / slice is a window."""
    if layers is None:
        return list(all_layers)
    if isinstance(layers, slice):
        return all_layers[layers]
    out = []
    for l in ([layers] if isinstance(layers, (int, str)) else list(layers)):
        if isinstance(l, int):
            if not -len(all_layers) <= l < len(all_layers):
                raise IndexError(f"layer {l} is out of range: there are {len(all_layers)} cross-attention layers "
                                 f"({all_layers})")
            out.append(all_layers[l])
        elif l in all_layers:
            out.append(l)
        else:
            raise KeyError(f"{l!r} is not a cross-attention layer; choose from {all_layers}")
    return out


def text_encoder_path(te: nn.Module, suffix: str) -> str:
    """The module path in a text encoder ending with `suffix` (CLIPTextModel nests it under text_model in
    some transformers versions and not in others)."""
    hits = [n for n, _ in te.named_modules() if n == suffix or n.endswith("." + suffix)]
    if not hits:
        raise KeyError(f"{type(te).__name__} has no module '*{suffix}'")
    return min(hits, key=len)


def _starts(tokenizer, concept: Concept) -> list[int]:
    return [edit_start(tokenizer, s, g) for s, g in zip(concept.sources, concept.guides)]


def _split(states: torch.Tensor, concept: Concept, n_pres: int):
    """Rows of states for [sources, guides (G per source), preserve] -> (src, guide mean, preserve)."""
    n, g = len(concept.sources), len(concept.guide_words)
    src = states[:n]
    guide = states[n:n + n * g].reshape(n, g, *states.shape[1:]).mean(1)
    return src, guide, states[n + n * g:n + n * g + n_pres]


def _rows(x: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    """Positions p_i.. of every item i, stacked: [sum_i (T - p_i), d]."""
    return torch.cat([x[i, p:] for i, p in enumerate(starts)])


def _prompt_list(concept: Concept, preserve: bool, extra_preserve: Sequence[str] = ("",)) -> tuple[list[str], int]:
    pres = list(concept.preserve) + [p for p in extra_preserve if p not in concept.preserve] if preserve else []
    return [*concept.sources, *(g for gs in concept.guides for g in gs), *pres], len(pres)


def solve_linear(linear: nn.Linear, keys: torch.Tensor, outputs: torch.Tensor, preserve: torch.Tensor | None,
                 lam: float, preserve_weight: float = 1.0) -> torch.Tensor:
    """Ridge solve for an nn.Linear whose targets are full outputs (the bias is subtracted first)."""
    b = linear.bias.detach().double() if linear.bias is not None else 0.0
    return ridge_solve(linear.weight.detach(), keys, outputs - b, preserve, lam, preserve_weight)


def _encode_sd(pipe, prompts: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt=list(prompts), device=_device(pipe), num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]


def unet_cross_inputs(pipe, prompts: Sequence[str], layers: Sequence[str], targets: Sequence[str] = ("to_k", "to_v")
                      ) -> dict[str, torch.Tensor]:
    """Inputs of every `layer.target` linear for these prompts, captured in a UNet forward through the engine."""
    emb = _encode_sd(pipe, prompts)
    unet = pipe.unet
    n = emb.shape[0]
    side = 2 ** (len(unet.config.block_out_channels) - 1)
    inputs = {"sample": torch.zeros(n, unet.config.in_channels, side, side, device=emb.device, dtype=emb.dtype),
              "timestep": torch.tensor(500, device=emb.device), "encoder_hidden_states": emb}
    sites = [f"module:{l}.{t}:input" for l in layers for t in targets]
    got = capture(unet, inputs, sites, batch_keys=("sample", "encoder_hidden_states"))
    return {f"{l}.{t}": got[f"module:{l}.{t}:input"] for l in layers for t in targets}


# ---------------------------------------------------------------------------------------------
# UCE / TIME / LocoEdit: cross-attention key and value projections
# ---------------------------------------------------------------------------------------------

def cross_attention_edit(pipe, concept: Concept, method: str = "uce", lam: float | None = None, layers=None,
                         targets: Sequence[str] = ("to_k", "to_v"), preserve: bool = True,
                         preserve_weight: float = 1.0) -> Edit:
    """UCE / TIME / LocoEdit: map the concept's text states to the guides' projections in each chosen
    cross-attention to_k / to_v, keeping the preserve prompts' (and the empty prompt's) projections."""
    lam = DEFAULT_LAM.get(method, 0.5) if lam is None else lam
    chosen = select_layers(cross_attention_layers(pipe.unet), layers)
    starts = _starts(pipe.tokenizer, concept)
    prompts, n_pres = _prompt_list(concept, preserve)
    inputs = unet_cross_inputs(pipe, prompts, chosen, targets)
    tensors = {}
    for name, x in inputs.items():
        lin = pipe.unet.get_submodule(name)
        src, guide, pres = _split(x, concept, n_pres)
        keys = _rows(src, starts)
        values = _rows(guide, starts) @ lin.weight.detach().double().T
        if lin.bias is not None:
            values = values + lin.bias.detach().double()
        W = solve_linear(lin, keys, values, pres.reshape(-1, x.shape[-1]) if n_pres else None, lam, preserve_weight)
        tensors[f"unet.{name}.weight"] = W
    return Edit(method, concept.word, tensors, lam, chosen,
                {"targets": list(targets), "preserve": bool(preserve),
                 "n_keys": int(sum(x.shape[1] - p for p in starts)), "n_preserve_prompts": n_pres,
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}})


def uce(pipe, concept: Concept, lam: float = 0.5, **kw) -> Edit:
    """Unified Concept Editing: every cross-attention to_k and to_v, with a preservation list (lam 0.5)."""
    return cross_attention_edit(pipe, concept, "uce", lam, **kw)


def time_edit(pipe, concept: Concept, lam: float = 0.1, preserve: bool = False, **kw) -> Edit:
    """TIME: every cross-attention to_k and to_v, ridge term only (lam 0.1), no preservation list by default."""
    return cross_attention_edit(pipe, concept, "time", lam, preserve=preserve, **kw)


def locoedit(pipe, concept: Concept, layers, lam: float = 0.5, **kw) -> Edit:
    """LocoEdit: the UCE solve on a window of consecutive cross-attention layers (pick it with choose_window)."""
    return cross_attention_edit(pipe, concept, "locoedit", lam, layers=layers, **kw)


def choose_window(pipe, concept: Concept, window: int, score, lam: float = 0.5, **kw) -> tuple[list[int], list[dict]]:
    """Trace which window of `window` consecutive cross-attention layers carries the concept: apply the edit
    on each window alone and score the edited pipeline with `score(pipe) -> float` (lower = concept more
    absent). Returns the best window (layer indices) and every window's score."""
    import copy

    n = len(cross_attention_layers(pipe.unet))
    if not 1 <= window <= n:
        raise ValueError(f"window must be between 1 and {n} (the number of cross-attention layers), got {window}")
    trace = []
    for start in range(n - window + 1):
        idx = list(range(start, start + window))
        edit = cross_attention_edit(pipe, concept, "locoedit", lam, layers=idx, **kw)
        edited = copy.deepcopy(pipe)
        edit.apply(edited)
        trace.append({"layers": idx, "score": float(score(edited))})
    best = min(trace, key=lambda t: t["score"])
    return best["layers"], trace


# ---------------------------------------------------------------------------------------------
# Diff-QuickFix: text-encoder layer-0 self-attention output projection
# ---------------------------------------------------------------------------------------------

def quickfix(pipe, concept: Concept, lam: float = 0.01, layer: int = 0, preserve: bool = True,
             preserve_weight: float = 1.0) -> Edit:
    """Diff-QuickFix: keys = out_proj inputs of the source prompts from the concept token on; values = out_proj
    outputs of the guide prompts at the same positions; preserve prompts keep their outputs."""
    te = pipe.text_encoder
    path = text_encoder_path(te, f"encoder.layers.{layer}.self_attn.out_proj")
    lin = te.get_submodule(path)
    starts = _starts(pipe.tokenizer, concept)
    prompts, n_pres = _prompt_list(concept, preserve)
    ids = tokenize_like_pipeline(pipe.tokenizer, prompts).to(_device(pipe))
    got = capture(te, ids, [f"module:{path}:input", f"module:{path}:output"])
    src_in, _, pres_in = _split(got[f"module:{path}:input"], concept, n_pres)
    _, guide_out, _ = _split(got[f"module:{path}:output"], concept, n_pres)
    W = solve_linear(lin, _rows(src_in, starts), _rows(guide_out, starts),
                     pres_in.reshape(-1, pres_in.shape[-1]) if n_pres else None, lam, preserve_weight)
    return Edit("quickfix", concept.word, {f"text_encoder.{path}.weight": W}, lam, [f"text_encoder.{path}"],
                {"preserve": bool(preserve), "n_preserve_prompts": n_pres,
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}})


# ---------------------------------------------------------------------------------------------
# SD3 / Flux: context_embedder and the pooled text projection
# ---------------------------------------------------------------------------------------------

def _transformer_inputs(pipe, prompts: Sequence[str]) -> tuple[dict, tuple[str, ...], object]:
    tr = pipe.transformer
    dev = _device(pipe)
    cls = type(tr).__name__
    with torch.no_grad():
        if cls.startswith("Flux"):
            emb, pooled, text_ids = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=dev)
            n = emb.shape[0]
            inputs = {"hidden_states": torch.zeros(n, 1, tr.config.in_channels, device=dev, dtype=emb.dtype),
                      "encoder_hidden_states": emb, "pooled_projections": pooled,
                      "timestep": torch.full((n,), 0.5, device=dev), "img_ids": torch.zeros(1, 3, device=dev),
                      "txt_ids": text_ids}
            if getattr(tr.config, "guidance_embeds", False):
                inputs["guidance"] = torch.full((n,), 3.5, device=dev)
            keys = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
            return inputs, keys, pipe.tokenizer_2
        emb, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=dev,
                                               do_classifier_free_guidance=False)
        n, p = emb.shape[0], tr.config.patch_size
        inputs = {"hidden_states": torch.zeros(n, tr.config.in_channels, p, p, device=dev, dtype=emb.dtype),
                  "encoder_hidden_states": emb, "pooled_projections": pooled,
                  "timestep": torch.full((n,), 500.0, device=dev)}
        return inputs, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"), pipe.tokenizer


def context_edit(pipe, concept: Concept, lam: float = 0.5, preserve: bool = True, pooled: bool = True,
                 preserve_weight: float = 1.0) -> Edit:
    """The ridge solve on an SD3 / Flux transformer's `context_embedder` (token states from the concept on)
    and, with pooled=True, on `time_text_embed.text_embedder.linear_1` (the pooled prompt embedding)."""
    tr = pipe.transformer
    if not isinstance(getattr(tr, "context_embedder", None), nn.Linear):
        raise ValueError(f"{type(tr).__name__} has no linear context_embedder; "
                         "the context edit is for SD3 / Flux transformers")
    prompts, n_pres = _prompt_list(concept, preserve)
    inputs, keys, tok = _transformer_inputs(pipe, prompts)
    starts = _starts(tok, concept)
    sites = {"context_embedder": "module:context_embedder:input"}
    if pooled and "time_text_embed.text_embedder.linear_1" in dict(tr.named_modules()):
        sites["time_text_embed.text_embedder.linear_1"] = "module:time_text_embed.text_embedder.linear_1:input"
    got = capture(tr, inputs, list(sites.values()), batch_keys=keys)
    tensors = {}
    for name, site in sites.items():
        lin = tr.get_submodule(name)
        x = got[site]
        src, guide, pres = _split(x, concept, n_pres)
        if x.dim() == 3:
            k, g = _rows(src, starts), _rows(guide, starts)
        else:
            k, g = src, guide
        out = g @ lin.weight.detach().double().T + (lin.bias.detach().double() if lin.bias is not None else 0.0)
        tensors[f"transformer.{name}.weight"] = solve_linear(
            lin, k, out, pres.reshape(-1, x.shape[-1]) if n_pres else None, lam, preserve_weight)
    return Edit("context", concept.word, tensors, lam, [f"transformer.{n}" for n in sites],
                {"preserve": bool(preserve), "n_preserve_prompts": n_pres,
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}})


# ---------------------------------------------------------------------------------------------
# LEACE folded into the cross-attention projections (or the text encoder)
# ---------------------------------------------------------------------------------------------

def _restore_mean(unet: nn.Module, name: str, lin: nn.Linear, er, tensors: dict) -> bool:
    """Bias-free to_k / to_v: the dropped constant A L R mu is harmless for keys (softmax ignores a shift
    shared by all keys) and, for values, passes through the attention unchanged (its weights sum to 1), so
    it is added to the bias of the output projection `to_out.0`. True when the mean is then exactly kept."""
    if name.endswith(".to_k"):
        return True
    out = unet.get_submodule(name[: -len(".to_v")] + ".to_out.0")
    if not isinstance(out, nn.Linear) or out.bias is None:
        return False
    shift = lin.weight.detach().double() @ (er.projection() @ er.mu)
    key = f"unet.{name[: -len('.to_v')]}.to_out.0.bias"
    base = tensors.get(key, out.bias.detach()).double()
    tensors[key] = (base + out.weight.detach().double() @ shift).to(out.bias.dtype)
    return True


#: leace_edit(contrast="offsets"): positions after the concept word erased one by one; the rest together
OFFSET_POSITIONS = 8


def _within_position_eraser(x: torch.Tensor, z: torch.Tensor, tol: float | None, site: str = ""):
    """LEACE of z (0/1 per item and position) within position groups: x [items, T, d] and z [items, T] are
    centred per group (positions 0..OFFSET_POSITIONS-1 each, the rest together), and z becomes one column
    per group, so the eraser removes each group's concept-vs-rest mean difference (whitened by the
    within-group covariance) and nothing that separates the groups; its mean is the data's global mean."""
    from dataclasses import replace

    T = x.shape[1]
    group = torch.clamp(torch.arange(T), max=OFFSET_POSITIONS)
    n_groups = int(group.max()) + 1
    x = x.double()
    xc = torch.empty_like(x)
    zc = torch.zeros(*z.shape, n_groups, dtype=torch.float64)
    for g in range(n_groups):
        cols = group == g
        xg, zg = x[:, cols], z[:, cols].double()
        xc[:, cols] = xg - xg.reshape(-1, xg.shape[-1]).mean(0)
        zc[:, cols, g] = zg - zg.mean()
    er = LeaceFitter(x.shape[-1], n_groups, tol=tol, site=site).update(xc.reshape(-1, x.shape[-1]),
                                                            zc.reshape(-1, n_groups)).eraser
    return replace(er, mu=x.reshape(-1, x.shape[-1]).mean(0))


def leace_edit(pipe, concept: Concept, site: str = "cross_attention", layers=None, preserve_negative: bool = True,
               tol: float | None = None, exact_mean: bool = True, contrast: str = "offsets") -> Edit:
    """Fit a LEACE eraser of "concept present" (source positions from the concept token on) against the
    preserve prompts' positions, then fold it into weights.

    site="cross_attention": fitted on the cross-attention inputs, folded before every to_k / to_v. They are
    bias-free; with exact_mean the lost mean term is restored through to_out.0's bias (see _restore_mean),
    so the edited attention equals a Project op on its text inputs; without it only the mean is lost.
    site="text_encoder": fitted on text-encoder layer 0's out_proj output and folded after it (bias kept, exact).
    contrast="offsets" (default; the only one that erased "red" from shapes-diffusion's images, docs/FINDINGS.md)
    is described last. contrast="all": the concept's tokens against every other token (prefixes and the empty
    prompt too);
    "aligned": against the other prompts' tokens at the same positions (from the concept position on);
    "offsets": as aligned, but the concept is erased separately at each position from the concept word on
    (each of the next 8 positions, then the rest, padding included): the concept's tokens against the other
    prompts' tokens *at the same position*, with the positions' own means taken out first, so what the
    positions differ in (which word stands there) is not erased, only what the concept changes there.
    After the fold, at every one of these positions the concept prompts' mean equals the other prompts'
    mean (rank <= 9); the global mean is kept.
    """
    if contrast not in ("all", "aligned", "offsets"):
        raise ValueError(f"contrast must be 'all', 'aligned' or 'offsets', not {contrast!r}")
    if site not in ("cross_attention", "text_encoder"):
        raise ValueError(f"site must be 'cross_attention' or 'text_encoder', not {site!r}")
    starts = _starts(pipe.tokenizer, concept)
    prompts, n_pres = _prompt_list(concept, True, ("",) if preserve_negative else ())
    n = len(concept.sources)
    keep = [*range(n), *range(len(prompts) - n_pres, len(prompts))]  # sources and preserve (not the guides)

    def labels(x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(x.shape[0], x.shape[1], dtype=torch.long)
        for i, p in enumerate(starts):
            z[i, p:] = 1
        return z

    def fit(x: torch.Tensor, site: str):
        x = x[keep]
        z = labels(x)
        if contrast in ("aligned", "offsets"):
            rows = [i for i, p in enumerate(prompts[j] for j in keep) if p != ""]
            p0 = min(starts)
            x, z = x[rows, p0:], z[rows, p0:]
        if contrast == "offsets":
            return _within_position_eraser(x, z, tol, site)
        return LeaceFitter(x.shape[-1], 1, tol=tol, site=site).update(x.reshape(-1, x.shape[-1]), z.reshape(-1)).eraser

    tensors, mean_kept, ranks, erasers = {}, [], [], {}
    if site == "cross_attention":
        chosen = select_layers(cross_attention_layers(pipe.unet), layers)
        inputs = unet_cross_inputs(pipe, prompts, chosen)
        for name, x in inputs.items():
            er = fit(x, f"unet.{name}")
            lin = pipe.unet.get_submodule(name)
            bias = None if lin.bias is None else lin.bias.detach()
            W, b, kept = fold_weights(lin.weight.detach(), bias, er, "before")
            tensors[f"unet.{name}.weight"] = W
            if b is not None:
                tensors[f"unet.{name}.bias"] = b
            elif exact_mean:
                kept = _restore_mean(pipe.unet, name, lin, er, tensors)
            erasers[f"module:{name}:input"] = er
            mean_kept.append(kept)
            ranks.append(er.rank)
        layer_names = chosen
    else:
        path = text_encoder_path(pipe.text_encoder, "encoder.layers.0.self_attn.out_proj")
        ids = tokenize_like_pipeline(pipe.tokenizer, prompts).to(_device(pipe))
        x = capture(pipe.text_encoder, ids, [f"module:{path}:output"])[f"module:{path}:output"]
        er = fit(x, f"text_encoder.{path}")
        lin = pipe.text_encoder.get_submodule(path)
        W, b, kept = fold_weights(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), er, "after")
        tensors[f"text_encoder.{path}.weight"] = W
        if b is not None:
            tensors[f"text_encoder.{path}.bias"] = b
        erasers[f"module:{path}:output"] = er
        mean_kept.append(kept)
        ranks.append(er.rank)
        layer_names = [f"text_encoder.{path}"]
    return Edit("leace", concept.word, tensors, None, layer_names,
                {"site": site, "contrast": contrast, "eraser_rank": ranks, "mean_preserved": all(mean_kept),
                 "n_preserve_prompts": n_pres,
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}}, erasers)
