"""Tiny random-weight configs of every model family the parity matrix covers (2 layers, width 32-64)."""
from __future__ import annotations

import torch

V = 96  # vocabulary
W = 32  # sliding window of the mixed-attention families; the check prompts are longer
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)


def _c(name: str, **kw):
    import transformers as tf

    return getattr(tf, name)(**kw)


def lm_configs() -> dict:
    """family -> (model class name, config kwargs builder)."""
    kv = dict(COMMON, num_key_value_heads=2)
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    return {
        "gpt2": ("GPT2LMHeadModel", lambda: _c("GPT2Config", vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                                n_positions=128)),
        "gpt_neox": ("GPTNeoXForCausalLM", lambda: _c("GPTNeoXConfig", **COMMON)),
        "gpt_neox_seq": ("GPTNeoXForCausalLM", lambda: _c("GPTNeoXConfig", use_parallel_residual=False, **COMMON)),
        "gptj": ("GPTJForCausalLM", lambda: _c("GPTJConfig", vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                               n_positions=128, rotary_dim=8)),
        "opt": ("OPTForCausalLM", lambda: _c("OPTConfig", vocab_size=V, hidden_size=64, ffn_dim=96,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=128, word_embed_proj_dim=64)),
        "opt_post_ln": ("OPTForCausalLM", lambda: _c("OPTConfig", vocab_size=V, hidden_size=64, ffn_dim=96,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     max_position_embeddings=128, word_embed_proj_dim=32,
                                                     do_layer_norm_before=False)),
        "bloom": ("BloomForCausalLM", lambda: _c("BloomConfig", vocab_size=V, hidden_size=64, n_layer=2, n_head=4)),
        "falcon": ("FalconForCausalLM", lambda: _c("FalconConfig", vocab_size=V, hidden_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4)),
        "falcon_new": ("FalconForCausalLM", lambda: _c("FalconConfig", vocab_size=V, hidden_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       new_decoder_architecture=True, num_kv_heads=2)),
        "llama": ("LlamaForCausalLM", lambda: _c("LlamaConfig", **kv)),
        "mistral": ("MistralForCausalLM", lambda: _c("MistralConfig", sliding_window=W, **kv)),
        "mixtral": ("MixtralForCausalLM", lambda: _c("MixtralConfig", **moe, **kv)),
        "qwen2": ("Qwen2ForCausalLM", lambda: _c("Qwen2Config", **kv)),
        "qwen2_moe": ("Qwen2MoeForCausalLM", lambda: _c("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                       **kv)),
        "qwen3": ("Qwen3ForCausalLM", lambda: _c("Qwen3Config", head_dim=16, **kv)),
        "qwen3_moe": ("Qwen3MoeForCausalLM", lambda: _c("Qwen3MoeConfig", head_dim=16, num_experts=4,
                                                       num_experts_per_tok=2, moe_intermediate_size=32, **kv)),
        "gemma": ("GemmaForCausalLM", lambda: _c("GemmaConfig", head_dim=16, **dict(COMMON, num_key_value_heads=1))),
        "gemma2": ("Gemma2ForCausalLM", lambda: _c("Gemma2Config", head_dim=16, sliding_window=W, **kv)),
        "gemma3": ("Gemma3ForCausalLM", lambda: _c("Gemma3TextConfig", head_dim=16, sliding_window=W,
                                                  layer_types=["sliding_attention", "full_attention"], **kv)),
        "phi": ("PhiForCausalLM", lambda: _c("PhiConfig", **COMMON)),
        "phi3": ("Phi3ForCausalLM", lambda: _c("Phi3Config", pad_token_id=0, **kv)),
        "olmo": ("OlmoForCausalLM", lambda: _c("OlmoConfig", **kv)),
        "olmo2": ("Olmo2ForCausalLM", lambda: _c("Olmo2Config", **kv)),
        "stablelm": ("StableLmForCausalLM", lambda: _c("StableLmConfig", **kv)),
        "cohere": ("CohereForCausalLM", lambda: _c("CohereConfig", **kv)),
        "starcoder2": ("Starcoder2ForCausalLM", lambda: _c("Starcoder2Config", sliding_window=W, **kv)),
        "granitemoe": ("GraniteMoeForCausalLM", lambda: _c("GraniteMoeConfig", num_local_experts=4,
                                                          num_experts_per_tok=2, **kv)),
        "deepseek_v3": ("DeepseekV3ForCausalLM", lambda: _c("DeepseekV3Config", n_routed_experts=4,
                                                           num_experts_per_tok=2, moe_intermediate_size=32,
                                                           first_k_dense_replace=1, n_group=1, topk_group=1,
                                                           q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                                           qk_nope_head_dim=8, v_head_dim=16, **kv)),
        "mamba": ("MambaForCausalLM", lambda: _c("MambaConfig", vocab_size=V, hidden_size=64, state_size=8,
                                                 num_hidden_layers=2, expand=2, conv_kernel=4)),
        "mamba2": ("Mamba2ForCausalLM", lambda: _c("Mamba2Config", vocab_size=V, hidden_size=64, state_size=8,
                                                   num_hidden_layers=2, expand=2, conv_kernel=4, num_heads=8,
                                                   head_dim=16, n_groups=1, chunk_size=16)),
    }


def build_lm(family: str):
    import transformers as tf

    cls, cfg = lm_configs()[family]
    torch.manual_seed(0)
    model = getattr(tf, cls)(cfg()).eval()
    return model


def encoder_configs() -> dict:
    enc = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=128)
    return {
        "bert": ("BertModel", lambda: _c("BertConfig", **enc)),
        "roberta": ("RobertaModel", lambda: _c("RobertaConfig", pad_token_id=1, **enc)),
        "distilbert": ("DistilBertModel", lambda: _c("DistilBertConfig", vocab_size=V, dim=64, n_layers=2, n_heads=4,
                                                     hidden_dim=96, max_position_embeddings=128)),
        "modernbert": ("ModernBertModel", lambda: _c("ModernBertConfig", pad_token_id=0, bos_token_id=1,
                                                     eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                                     global_attn_every_n_layers=2, local_attention=16, **enc)),
    }


def build(family: str):
    import transformers as tf

    table = {**lm_configs(), **encoder_configs(), **text_encoder_configs()}
    cls, cfg = table[family]
    torch.manual_seed(0)
    return getattr(tf, cls)(cfg()).eval()


def text_encoder_configs() -> dict:
    clip = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, projection_dim=32, eos_token_id=2)
    return {
        "clip": ("CLIPTextModel", lambda: _c("CLIPTextConfig", **clip)),
        "clip_projection": ("CLIPTextModelWithProjection", lambda: _c("CLIPTextConfig", **clip)),
        "t5": ("T5EncoderModel", lambda: _c("T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                            num_heads=4, relative_attention_num_buckets=8)),
        "umt5": ("UMT5EncoderModel", lambda: _c("UMT5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=96,
                                                num_layers=2, num_heads=4, relative_attention_num_buckets=8)),
    }


# ---------------------------------------------------------------------------------------------
# diffusers denoisers: (builder, inputs(batch, seed) -> call kwargs)
# ---------------------------------------------------------------------------------------------

def _randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def denoiser_configs() -> dict:
    import diffusers as d

    def unet_cond():
        return d.UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                      block_out_channels=(8, 16),
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                      attention_head_dim=4, norm_num_groups=4)

    def unet_cond_in(b, s):
        return {"sample": _randn(s, b, 3, 8, 8), "timestep": torch.tensor([10 + s] * b),
                "encoder_hidden_states": _randn(s + 1, b, 6, 32)}

    def sd3():
        return d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                       caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8)

    def sd3_in(b, s):
        return {"hidden_states": _randn(s, b, 3, 8, 8), "timestep": torch.tensor([10.0 + s] * b),
                "encoder_hidden_states": _randn(s + 1, b, 6, 32), "pooled_projections": _randn(s + 2, b, 16)}

    def flux():
        return d.FluxTransformer2DModel(patch_size=1, in_channels=12, num_layers=1, num_single_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))

    def flux_in(b, s):
        return {"hidden_states": _randn(s, b, 16, 12), "timestep": torch.tensor([0.5 + s / 10] * b),
                "encoder_hidden_states": _randn(s + 1, b, 6, 16), "pooled_projections": _randn(s + 2, b, 16),
                "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(6, 3)}

    def unet2d():
        return d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                             block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)

    def unet2d_in(b, s):
        return {"sample": _randn(s, b, 3, 8, 8), "timestep": torch.tensor([10 + s] * b)}

    def t(b, s, float_=False):
        return torch.tensor([(0.5 if float_ else 10) + s] * b, dtype=torch.float32 if float_ else torch.long)

    def txt(b, s, n=5, d_=16):
        return _randn(s + 1, b, n, d_)

    dits = {
        "pixart": (lambda: d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                      out_channels=8, num_layers=2, cross_attention_dim=16,
                                                      caption_channels=16, sample_size=8, norm_num_groups=2,
                                                      patch_size=2, use_additional_conditions=False),
                   lambda b, s: dict(hidden_states=_randn(s, b, 4, 8, 8), encoder_hidden_states=txt(b, s),
                                     timestep=t(b, s))),
        "sana": (lambda: d.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                  attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                                                  cross_attention_head_dim=8, cross_attention_dim=16,
                                                  caption_channels=16, sample_size=8, patch_size=1, mlp_ratio=2.0),
                 lambda b, s: dict(hidden_states=_randn(s, b, 4, 8, 8), encoder_hidden_states=txt(b, s),
                                   timestep=t(b, s))),
        "hunyuan_dit": (lambda: d.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                    patch_size=2, num_layers=2, sample_size=8, hidden_size=16,
                                                    cross_attention_dim=16, cross_attention_dim_t5=16,
                                                    pooled_projection_dim=8, text_len=5, text_len_t5=5,
                                                    use_style_cond_and_image_meta_size=False),
                        lambda b, s: dict(hidden_states=_randn(s, b, 4, 8, 8), timestep=t(b, s, True),
                                          encoder_hidden_states=txt(b, s), text_embedding_mask=torch.ones(b, 5),
                                          encoder_hidden_states_t5=txt(b, s + 7),
                                          text_embedding_mask_t5=torch.ones(b, 5))),
        "auraflow": (lambda: d.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4,
                                                          num_mmdit_layers=1, num_single_dit_layers=1,
                                                          attention_head_dim=8, num_attention_heads=2,
                                                          joint_attention_dim=16, caption_projection_dim=16,
                                                          out_channels=4, pos_embed_max_size=16),
                     lambda b, s: dict(hidden_states=_randn(s, b, 4, 8, 8), encoder_hidden_states=txt(b, s),
                                       timestep=t(b, s, True))),
        "lumina2": (lambda: d.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                                        hidden_size=32, num_layers=2, num_refiner_layers=1,
                                                        num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                                        cap_feat_dim=16, axes_dim_rope=(4, 6, 6),
                                                        axes_lens=(32, 32, 32)),
                    lambda b, s: dict(hidden_states=_randn(s, b, 4, 8, 8), timestep=t(b, s, True) / 10,
                                      encoder_hidden_states=txt(b, s),
                                      encoder_attention_mask=torch.ones(b, 5, dtype=torch.bool))),
        "cogvideox": (lambda: d.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                            out_channels=4, num_layers=2, text_embed_dim=16,
                                                            time_embed_dim=8, sample_width=8, sample_height=8,
                                                            sample_frames=5, patch_size=2, max_text_seq_length=5,
                                                            use_rotary_positional_embeddings=False),
                      lambda b, s: dict(hidden_states=_randn(s, b, 2, 4, 8, 8), encoder_hidden_states=txt(b, s),
                                        timestep=t(b, s))),
        "wan": (lambda: d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                                in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                                num_layers=2, rope_max_seq_len=32),
                lambda b, s: dict(hidden_states=_randn(s, b, 4, 2, 8, 8), encoder_hidden_states=txt(b, s),
                                  timestep=t(b, s))),
        "ltx_video": (lambda: d.LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                                           num_attention_heads=2, attention_head_dim=8,
                                                           cross_attention_dim=16, num_layers=2, caption_channels=16),
                      lambda b, s: dict(hidden_states=_randn(s, b, 32, 4), encoder_hidden_states=txt(b, s),
                                        timestep=t(b, s), encoder_attention_mask=torch.ones(b, 5), num_frames=2,
                                        height=4, width=4)),
    }
    return {"unet2d_condition": (unet_cond, unet_cond_in), "sd3": (sd3, sd3_in), "flux": (flux, flux_in),
            "unet2d": (unet2d, unet2d_in), **dits}


def build_denoiser(family: str):
    make, inputs = denoiser_configs()[family]
    torch.manual_seed(0)
    return make().eval(), inputs
