"""The architectures of the project-trained zoo models, built with random weights (docs/ZOO.md).

`build_diffusion_pipeline` (shapes-diffusion: UNet2DConditionModel + CLIP text encoder, DDIM, pixel space),
`build_flow_pipeline` (shapes-flow: SD3Transformer2DModel + two CLIP text encoders, flow matching),
`build_tokenizer` (a CLIP BPE tokenizer whose every caption word is one token) and `identity_vae`
(an AutoencoderKL that is the identity). The training recipes (`interp zoo-train`) start from these;
tests and benchmarks build them too. Building draws its random weights from a forked RNG seeded with
`seed`, so the caller's global torch RNG state is left as it was.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

MAX_TOKENS = 16  # caption length in tokens (longest caption: 11 with BOS/EOS)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer(max_length: int = MAX_TOKENS):
    """A real CLIP BPE tokenizer built in memory: byte-level base + merges making every caption
    word one token. Any other text still tokenizes (byte fallback)."""
    from transformers import CLIPTokenizer

    from interp.zoo.shapes import caption_words

    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for t in base:
        vocab.setdefault(t, len(vocab))
    for t in base:
        vocab.setdefault(t + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []

    def bpe(word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = {m: i for i, m in enumerate(merges)}
        while len(parts) > 1:
            r, i = min((ranks.get(p, math.inf), i) for i, p in enumerate(zip(parts, parts[1:])))
            if r == math.inf:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        return parts

    for w in caption_words():
        while len(p := bpe(w)) > 1:  # append lowest-priority merges until the word is one token
            merges.append((p[0], p[1]))
            vocab.setdefault(p[0] + p[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # transformers 5 takes merges as (a, b) pairs; its type hint names only strings
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


def identity_vae(channels: int = 16):
    """An ``AutoencoderKL`` whose encoder mean and decoder are the identity (error ~1e-6).

    One block, no downsampling (vae_scale_factor 1), latent = 3 channels = the pixels in
    [-1, 1]. conv_in writes +x, -x and large constant channels (+-B); every resnet's conv2 is
    zero (identity); the final GroupNorm then divides by a constant (the +-B channels dominate
    the group variance, and +x/-x cancel in the mean), its affine restores the scale around a
    large offset where SiLU is linear, and conv_out takes (a - b)/2. Log-variance is -30.
    """
    from diffusers import AutoencoderKL

    # Any: mypy does not see AutoencoderKL's torch.nn.Module base through diffusers' lazy imports
    vae: Any = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(channels,), layers_per_block=1,
                        latent_channels=3, norm_num_groups=1, sample_size=32, scaling_factor=1.0, shift_factor=0.0,
                        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    big, offset = 1000.0, 20.0
    n_const = channels - 6
    sigma0 = (n_const * big * big / channels) ** 0.5
    with torch.no_grad():
        for coder, logvar in ((vae.encoder, True), (vae.decoder, False)):
            for p in coder.parameters():
                p.zero_()
            for m in coder.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.weight.fill_(1.0)
            ci = coder.conv_in
            for c in range(3):
                ci.weight[c, c, 1, 1] = 1.0
                ci.weight[3 + c, c, 1, 1] = -1.0
            ci.bias[6:6 + n_const // 2] = big
            ci.bias[6 + n_const // 2:] = -big
            g = coder.conv_norm_out
            g.weight.zero_()
            g.bias.zero_()
            g.weight[:6] = sigma0
            g.bias[:6] = offset
            co = coder.conv_out
            for c in range(3):
                co.weight[c, c, 1, 1] = 0.5
                co.weight[c, 3 + c, 1, 1] = -0.5
            if logvar:
                co.bias[3:] = -30.0
    vae.requires_grad_(False)
    return vae.eval()


def _clip_config(tok, hidden: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_TOKENS,
                          projection_dim=projection or hidden, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_diffusion_pipeline(seed: int = 0, width: int = 16):
    """shapes-diffusion's pipeline with random weights (UNet width `width`, seeded by `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _diffusion_pipeline(width)


def _diffusion_pipeline(width: int):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from interp.zoo.catalog import diffusion_pipeline_class

    tok = build_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tok, 64, 3, 4))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          prediction_type="sample", clip_sample=False, thresholding=True,
                          dynamic_thresholding_ratio=0.995, sample_max_value=1.0, set_alpha_to_one=True, steps_offset=1,
                          timestep_spacing="leading")
    return diffusion_pipeline_class()(vae=identity_vae(), text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_flow_pipeline(seed: int = 0, heads: int = 4, layers: int = 4):
    """shapes-flow's pipeline with random weights (`heads` heads, `layers` layers, seeded by `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _flow_pipeline(heads, layers)


def _flow_pipeline(heads: int, layers: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from interp.zoo.catalog import flow_pipeline_class

    tok = build_tokenizer()
    te1 = CLIPTextModelWithProjection(_clip_config(tok, 64, 3, 4, projection=32))
    te2 = CLIPTextModelWithProjection(_clip_config(tok, 32, 2, 2, projection=32))
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=layers, attention_head_dim=16,
        num_attention_heads=heads, joint_attention_dim=96, caption_projection_dim=16 * heads,
        pooled_projection_dim=64, pos_embed_max_size=16)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return flow_pipeline_class()(transformer=transformer, scheduler=sched, vae=identity_vae(), text_encoder=te1,
                                 tokenizer=tok, text_encoder_2=te2, tokenizer_2=copy.deepcopy(tok),
                                 text_encoder_3=None, tokenizer_3=None)


__all__ = ["build_tokenizer", "identity_vae", "build_diffusion_pipeline", "build_flow_pipeline", "MAX_TOKENS"]
