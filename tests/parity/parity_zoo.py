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

    table = {**lm_configs(), **encoder_configs()}
    cls, cfg = table[family]
    torch.manual_seed(0)
    return getattr(tf, cls)(cfg()).eval()
