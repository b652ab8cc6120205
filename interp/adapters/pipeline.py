"""diffusers pipelines (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, ...), used as they are.

Sites are the components' sites prefixed by the component name: `text_encoder.blocks.0.attn.out`,
`text_encoder_2.final`, `unet.down.1.attn.0.cross.out`, `transformer.blocks.7.img` (see
text_encoder.py, unet.py, dit.py). Every module of every component is also reachable raw
(`module:unet.conv_in`).

One run = one call of the pipeline (`pipe(prompt, generator=..., callback_on_step_end=...)`). The
adapter only adds hooks and a step callback; it never copies pipeline code. While the pipeline runs,
the hooks know:
  - the denoising step: 0 before the first scheduler step, i + 1 after step i (the pipeline's
    `callback_on_step_end`); text-encoder calls happen before the loop and have no step;
  - the classifier-free-guidance branch of every row: a denoiser call with 2N rows holds the
    unconditional rows first, then the conditional ones (as every diffusers pipeline concatenates
    them); a call with N rows is the conditional branch, or the unconditional one when it is the
    second call of a step (Flux true CFG); the first call of a text encoder encodes the prompts
    (cond), the second the negative prompts (uncond).
Latents come from one seeded generator per image, so clean, corrupted and restored runs and every row
of a batched grid start from the same noise.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InterpError, SpecError
from ..hooks import Entry
from ..sites import Site, SiteTable
from .base import Adapter, Prepared, module_paths
from .dit import dit_sites, is_dit
from .text_encoder import is_text_encoder, text_encoder_kind, text_encoder_sites
from .unet import is_unet, unet_sites

TEXT_COMPONENTS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
DENOISERS = ("unet", "transformer")


def is_pipeline(obj: Any) -> bool:
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__) and \
        any(isinstance(getattr(obj, d, None), nn.Module) for d in DENOISERS)


@dataclass(frozen=True)
class Sampling:
    """One sampling request: prompts, seeds (one per image: an int s gives s, s+1, ...), steps, guidance.

    `options` holds any other pipeline call argument (e.g. max_sequence_length, true_cfg_scale).
    """

    prompt: str | Sequence[str]
    seed: int | Sequence[int] = 0
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | Sequence[str] | None = None
    height: int | None = None
    width: int | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise SpecError(f"Sampling(steps={self.steps!r}): the number of denoising steps is an int >= 1")
        if self.guidance is not None and not math.isfinite(float(self.guidance)):
            raise SpecError(f"Sampling(guidance={self.guidance!r}) is not finite")
        if not self.prompts() or any(not isinstance(p, str) for p in self.prompts()):
            raise SpecError("Sampling(prompt=...) takes a prompt string or a non-empty list of strings")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def seeds(self) -> list[int]:
        n = len(self.prompts())
        if isinstance(self.seed, int):
            return [self.seed + i for i in range(n)]
        seeds = [int(s) for s in self.seed]
        if len(seeds) != n:
            raise ValueError(f"Sampling has {n} prompts but {len(seeds)} seeds; give one seed per prompt or one int")
        return seeds

    def replace(self, **kw) -> Sampling:
        from dataclasses import replace

        return replace(self, **kw)


@dataclass
class SampleOutput:
    """What a pipeline run returns.

    images [N, 3, H, W] in [0, 1]; latents: final latents [N, ...]; pred / pred_uncond: the denoiser's
    outputs per step for the conditional / unconditional rows [steps, N, ...] (pred_uncond is None
    without classifier-free guidance); calls: per component, one {"step", "branches"} record per call
    (how captured activations line up with steps and branches).
    """

    images: torch.Tensor
    latents: torch.Tensor | None
    pred: torch.Tensor | None
    pred_uncond: torch.Tensor | None
    calls: dict[str, list[dict]]
    n_steps: int
    inputs: list[tuple[dict, dict, int]] | None = None  # denoiser call kwargs, branches, step (record_inputs)

    def __getitem__(self, i):
        return self.images[i]

    def __len__(self) -> int:
        return self.images.shape[0]

    def element_size(self) -> int:  # lets the engine size grid chunks like a logits tensor
        return self.images.element_size()


class PipelinePrepared(Prepared):
    """Prompt indices and seeds (batch tensors, so grids repeat them) plus the Sampling request."""

    def __init__(self, kwargs, batch, seq_len, tokens, spec: Sampling, views: dict[str, list[list[str]]]):
        super().__init__(kwargs, batch, seq_len, tokens)
        self.spec, self.views = spec, views

    def site_view(self, site: Site) -> list:
        """Token strings per item for the site's token axis, or [None] (positions index the site's axis 1)."""
        comp = site.meta.get("component", "")
        if comp in self.views:
            return self.views[comp]
        if site.meta.get("token_axis") and "__context__" in self.views:
            return self.views["__context__"]
        return [None]

    def repeat(self, n: int) -> PipelinePrepared:
        if n == 1:
            return self
        kw = {k: v.repeat(n) for k, v in self.kwargs.items()}
        return PipelinePrepared(kw, self.batch * n, self.seq_len, self.tokens * n, self.spec,
                                {k: v * n for k, v in self.views.items()})


class _PipelineRoot(nn.Module):
    """Holds the pipeline's components by reference so hooks find them by path; changes nothing."""

    def __init__(self, components: dict[str, nn.Module]):
        super().__init__()
        for k, m in components.items():
            self.add_module(k, m)


class PipelineSiteTable(SiteTable):
    def __init__(self, *a, components: Sequence[str] = (), **kw):
        super().__init__(*a, **kw)
        self.components = list(components)

    def _unknown_message(self, pattern: str) -> str:
        head = pattern.split(".", 1)[0]
        msg = super()._unknown_message(pattern)
        if head not in self.components and not pattern.startswith("module:"):
            msg = (f"unknown component {head!r} in site {pattern!r}: this pipeline's components are "
                   f"{', '.join(self.components)}. " + msg)
        return msg


def _token_strings(tok, ids: torch.Tensor) -> list[list[str]]:
    out = []
    for row in ids.tolist():
        toks = []
        for t in tok.convert_ids_to_tokens(row):
            t = str(t)
            if t.endswith("</w>"):
                t = t[:-4] + " "
            elif t.startswith("\u2581") or t.startswith("\u0120"):
                t = " " + t[1:]
            toks.append(t)
        out.append(toks)
    return out


class _CallState:
    """Per-run bookkeeping shared by the context hooks and the step callback."""

    def __init__(self, ctx, n_rows: int | None = None):
        self.ctx, self.n = ctx, n_rows
        self.step, self.calls_in_step = 0, 0
        self.text_calls: dict[str, int] = {}
        self.calls: dict[str, list[dict]] = {}
        self.preds: list[tuple[int, dict, torch.Tensor]] = []
        self.latents = None
        self.inputs: list[tuple[dict, dict, int]] | None = None  # denoiser call kwargs, branches, step (recording)

    def text_call(self, comp: str, io) -> None:
        args, kwargs, _ = io
        ids = args[0] if args else kwargs.get("input_ids")
        m = ids.shape[0] if isinstance(ids, torch.Tensor) else self.n
        if m is None:
            raise InterpError(f"the {comp} was called without input_ids outside a pipeline run of interp's engine")
        k = self.text_calls.get(comp, 0)
        self.text_calls[comp] = k + 1
        branch = "cond" if k == 0 else "uncond"
        self.ctx.step = None
        self.ctx.branches = {branch: list(range(m))}
        self.calls.setdefault(comp, []).append({"step": None, "branches": self.ctx.branches})

    def denoiser_call(self, comp: str, model: nn.Module, io) -> None:
        args, kwargs, _ = io
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        m, n = x.shape[0], self.n
        if n is None:
            raise InterpError(f"the {comp} was called outside a pipeline run of interp's engine (no image count)")
        if m == 2 * n:
            branches = {"uncond": list(range(n)), "cond": list(range(n, 2 * n))}
        elif m == n:
            branches = {("cond" if self.calls_in_step == 0 else "uncond"): list(range(n))}
        else:
            raise InterpError(f"the {comp} was called with {m} rows, but this run has {n} images: interp handles "
                              f"classifier-free guidance batches of {n} or {2 * n} rows (num_images_per_prompt=1)")
        self.calls_in_step += 1
        self.ctx.step, self.ctx.branches = self.step, branches
        self.calls.setdefault(comp, []).append({"step": self.step, "branches": branches})
        if self.inputs is not None:
            from .unet import denoiser_kwargs

            kw = denoiser_kwargs(model, args, kwargs)
            kept = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            self.inputs.append((kept, branches, self.step))

    def denoiser_out(self, io) -> None:
        out = io[2]
        t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        self.preds.append((self.ctx.step, self.ctx.branches, t.detach()))

    def callback(self, pipe, i, t, callback_kwargs):
        self.step, self.calls_in_step = i + 1, 0
        self.latents = callback_kwargs.get("latents")
        return {}


class PipelineAdapter(Adapter):
    family = "pipeline"

    def __init__(self, pipe, tokenizer=None) -> None:
        self.pipe = pipe
        self.text_components = [c for c in TEXT_COMPONENTS if is_text_encoder(getattr(pipe, c, None))]
        self.denoiser = next(d for d in DENOISERS if isinstance(getattr(pipe, d, None), nn.Module))
        comps = {c: getattr(pipe, c) for c in (*self.text_components, self.denoiser)}
        if isinstance(getattr(pipe, "vae", None), nn.Module):
            comps["vae"] = pipe.vae
        super().__init__(_PipelineRoot(comps), tokenizer or getattr(pipe, "tokenizer", None))
        self.model = pipe
        self._table: PipelineSiteTable | None = None
        self._state: _CallState | None = None
        self.record_inputs = False
        self.replay: tuple[int, SampleOutput] | None = None  # (first step computed, base run): see _replaying_denoiser

    # -- sites ---------------------------------------------------------------------------------
    def site_table(self) -> SiteTable:
        if self._table is None:
            sites: list[Site] = []
            for c in self.text_components:
                sites += text_encoder_sites(getattr(self.pipe, c), prefix=f"{c}.", module_prefix=f"{c}.")
            den = getattr(self.pipe, self.denoiser)
            fn = unet_sites if is_unet(den) else dit_sites
            if not (is_unet(den) or is_dit(den)):
                raise TypeError(f"interp has no site map for a {type(den).__name__} denoiser; use raw module sites")
            sites += fn(den, prefix=f"{self.denoiser}.", module_prefix=f"{self.denoiser}.")
            self._table = PipelineSiteTable(sites, module_names=module_paths(self.root),
                                            components=[*self.text_components, self.denoiser])
        return self._table

    # -- inputs --------------------------------------------------------------------------------
    def default(self, name: str, fallback=None):
        p = inspect.signature(type(self.pipe).__call__).parameters.get(name)
        return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback

    def n_steps(self, spec: Sampling) -> int:
        return int(spec.steps if spec.steps is not None else self.default("num_inference_steps", 50))

    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
            spec = Sampling(inputs if isinstance(inputs, str) else list(inputs))
        elif isinstance(inputs, Sampling):
            spec = inputs
        elif isinstance(inputs, dict):
            spec = Sampling(**inputs)
        else:
            raise TypeError(f"a diffusers pipeline takes a prompt, a list of prompts, an interp.diffusion.Sampling "
                            f"or a dict of Sampling fields, not {type(inputs).__name__}")
        prompts = spec.prompts()
        views: dict[str, list[list[str]]] = {}
        for c in self.text_components:
            tok = getattr(self.pipe, TEXT_COMPONENTS[c], None)
            if tok is None:
                continue
            if text_encoder_kind(getattr(self.pipe, c)) == "t5":
                length = spec.options.get("max_sequence_length", self.default("max_sequence_length", 256))
            else:
                length = getattr(self.pipe, "tokenizer_max_length", None) or tok.model_max_length
            ids = tok(prompts, padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt")["input_ids"]
            views[c] = _token_strings(tok, ids)
        first = views.get(self.text_components[0]) if self.text_components else None
        if self.denoiser == "transformer" and type(self.pipe.transformer).__name__ == "FluxTransformer2DModel":
            ctx_tokens = views.get("text_encoder_2")
        elif self.denoiser == "transformer":  # SD3: CLIP tokens, then T5's
            t5 = views.get("text_encoder_3", [[]] * len(prompts))
            ctx_tokens = [a + b for a, b in zip(first, t5)] if first else None
        else:
            ctx_tokens = first
        if ctx_tokens is not None:
            views["__context__"] = ctx_tokens
        kw = {"prompt_idx": torch.arange(len(prompts)), "seed": torch.tensor(spec.seeds())}
        return PipelinePrepared(kw, len(prompts), len(first[0]) if first else None, first or [], spec, views)

    # -- running -------------------------------------------------------------------------------
    def context_entries(self, ctx) -> list[Entry]:
        """Hooks that tell the engine the step and CFG rows of every call (registered before the site hooks)."""
        st = self._state = _CallState(ctx)
        if self.record_inputs:
            st.inputs = []
        den = getattr(self.pipe, self.denoiser)
        out = [Entry(Site(f"__ctx.{c}", c, io="input", slot=0, arg_name="input_ids"),
                     functools.partial(st.text_call, c), raw_io=True) for c in self.text_components]
        out.append(Entry(Site("__ctx.denoiser", self.denoiser, io="input", slot=0),
                         (lambda io: st.denoiser_call(self.denoiser, den, io)), raw_io=True))
        out.append(Entry(Site("__ctx.denoiser.out", self.denoiser, io="output", slot=0), st.denoiser_out, raw_io=True))
        return out

    def forward(self, prepared: Prepared, last_only: bool = False) -> SampleOutput:
        if not isinstance(prepared, PipelinePrepared):
            raise TypeError("a pipeline run needs inputs prepared by the pipeline adapter (prompts or a Sampling)")
        st = self._state
        if st is None:
            raise InterpError("pipeline runs go through interp's engine (attach(pipe).run / run_grid), which installs "
                              "the step and branch hooks")
        self._state = None
        spec, n = prepared.spec, prepared.batch
        st.n = n
        prompts = spec.prompts()
        idx = prepared.kwargs["prompt_idx"].tolist()
        kw = dict(prompt=[prompts[i] for i in idx], output_type="pt", callback_on_step_end=st.callback,
                  generator=[torch.Generator("cpu").manual_seed(int(s)) for s in prepared.kwargs["seed"].tolist()],
                  num_inference_steps=self.n_steps(spec))
        if spec.guidance is not None:
            kw["guidance_scale"] = spec.guidance
        if spec.negative_prompt is not None:
            neg_spec = spec.negative_prompt
            neg = [neg_spec] * len(prompts) if isinstance(neg_spec, str) else list(neg_spec)
            kw["negative_prompt"] = [neg[i] for i in idx]
        if spec.height is not None:
            kw["height"] = spec.height
        if spec.width is not None:
            kw["width"] = spec.width
        kw.update(spec.options)
        ctx = st.ctx
        ctx.n_steps, ctx.step, ctx.branches = kw["num_inference_steps"], None, None
        bar = getattr(self.pipe, "_progress_bar_config", None)
        self.pipe.set_progress_bar_config(disable=True)
        den = getattr(self.pipe, self.denoiser)
        # an instance-level forward may already be there (accelerate's offload hooks put theirs there): the
        # replaying forward calls it for the computed steps and it is put back afterwards
        own = vars(den).get("forward")
        if self.replay is not None:
            den.forward = self._replaying_denoiser(den, ctx, n)
        try:
            out = self.pipe(**kw)
        finally:
            if self.replay is not None:
                if own is None:
                    del den.forward  # the instance attribute shadowed the class's forward
                else:
                    den.forward = own
            ctx.step, ctx.branches = None, None
            if bar is None:
                del self.pipe._progress_bar_config
            else:
                self.pipe._progress_bar_config = bar
        images = out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images)
        pred, pred_u = self._predictions(st, n)
        result = SampleOutput(images, st.latents, pred, pred_u, st.calls, ctx.n_steps)
        result.inputs = st.inputs
        return result

    def _replaying_denoiser(self, den: nn.Module, ctx, n: int):
        """den.forward for a run whose images all follow a recorded base run up to step `first` (step-prefix
        reuse, set by interp.diffusion.sample_grid): a denoiser call before that step returns the base run's
        prediction for each image (image i of this run is image i % N of the base's N) instead of computing
        it, so the scheduler steps the same latents as the base run. The call still passes through the
        module's hooks, so steps, branches and recorded predictions are as in a computed run. Calls that ask
        for an output object (return_dict=True) are computed."""
        if self.replay is None:
            raise InterpError("the replaying denoiser needs a base run (set by interp.diffusion.sample_grid)")
        first, base = self.replay
        orig = den.forward
        preds = {"cond": base.pred, "uncond": base.pred_uncond}

        def forward(*args, **kwargs):
            step, branches = ctx.step, ctx.branches
            if step is None or step >= first or kwargs.get("return_dict", True) is not False or branches is None:
                return orig(*args, **kwargs)
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            out = None
            for b, rows in branches.items():
                src = preds[b][step]
                if out is None:
                    out = src.new_empty((x.shape[0], *src.shape[1:]))
                out[rows] = src[torch.arange(len(rows)) % src.shape[0]].to(out.device)
            return (out,)

        return forward

    @staticmethod
    def _predictions(st: _CallState, n: int):
        by: dict[str, dict[int, torch.Tensor]] = {"cond": {}, "uncond": {}}
        for step, branches, t in st.preds:
            for b, rows in branches.items():
                by[b][step] = t[rows[0]:rows[-1] + 1]
        stack = lambda d: torch.stack([d[s] for s in sorted(d)]) if d else None
        return stack(by["cond"]), stack(by["uncond"])

    # metrics on a pipeline take the whole SampleOutput (images, latents, predictions), not one tensor
    def main_output(self, output) -> SampleOutput:  # type: ignore[override]
        return output

    def describe(self) -> str:
        return f"pipeline ({type(self.pipe).__name__}: {', '.join([*self.text_components, self.denoiser])})"
