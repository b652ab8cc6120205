"""Tiny random pipelines of every diffusers family interp claims (built offline, in seconds).

Imported by the diffusion tests and benchmarks/diffusion_trace.py; holds no tests itself.
Images are 8x8 through an identity VAE (latents = pixels), text encoders are 2-layer CLIP / T5.
"""
from __future__ import annotations

import torch


def _tok():
    from interp.zoo.architectures import build_tokenizer

    return build_tokenizer()


def _clip(tok, hidden=32, layers=2, heads=2, proj=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=16,
        projection_dim=proj or hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()


def _vae():
    from interp.zoo.architectures import identity_vae

    return identity_vae()


def tiny_sd(seed: int = 0):
    """StableDiffusionPipeline: SD1.5-like UNet (cross-attn down/up blocks, cross-attn mid block), DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = _tok()
    te = _clip(tok, seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0):
    """StableDiffusionXLPipeline: two text encoders, 2 transformer blocks per attention, added conditioning."""
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = _tok()
    te1 = _clip(tok, hidden=16, seed=seed)
    te2 = _clip(tok, hidden=16, proj=8, seed=seed + 2)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                transformer_layers_per_block=(1, 2), attention_head_dim=4, norm_num_groups=4,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=8 + 6 * 4, use_linear_projection=True).eval()
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=copy.deepcopy(tok), unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(seed: int = 0):
    """StableDiffusion3Pipeline without T5 (zero T5 tokens, max_sequence_length in Sampling.options)."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = _tok()
    te1 = _clip(tok, hidden=16, proj=8, seed=seed)
    te2 = _clip(tok, hidden=16, proj=8, seed=seed + 2)
    torch.manual_seed(seed + 1)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(),
                                    text_encoder=te1, tokenizer=tok, text_encoder_2=te2,
                                    tokenizer_2=copy.deepcopy(tok), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0):
    """FluxPipeline: CLIP (pooled) + T5 (sequence), 1 double-stream + 1 single-stream block."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = _tok()
    te1 = _clip(tok, hidden=16, seed=seed)
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id)).eval()
    torch.manual_seed(seed + 1)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                axes_dims_rope=(2, 2, 4)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(), text_encoder=te1,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=copy.deepcopy(tok), transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLUX_OPTIONS = {"max_sequence_length": 16}
SD3_OPTIONS = {"max_sequence_length": 4}
