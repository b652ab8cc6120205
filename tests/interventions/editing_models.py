"""Models for the editing tests: a constructed Llama whose layer-0 MLP stores subject -> object facts as
orthogonal key-value pairs, and tiny random GPT-2 (Conv1D) / Llama (Linear) models."""
from __future__ import annotations

import torch

SUBJECTS = [" France", " Italy", " Spain", " Japan", " China", " Egypt"]
OBJECTS = [" Paris", " Rome", " Madrid", " Tokyo", " Beijing", " Cairo"]
D, D_MLP, GATE, C_VAL = 32, 16, 4.0, 1.0
HEAD_SCALE = 40.0


def key_scale() -> float:
    """a: the key of subject i is exactly a * e_i (RMSNorm maps e_i to sqrt(D) e_i; silu(GATE sqrt(D)) sqrt(D))."""
    s = D ** 0.5
    return float(torch.nn.functional.silu(torch.tensor(GATE * s)) * s)


def obj_dir(j: int) -> torch.Tensor:
    u = torch.zeros(D)
    u[8 + j] = 1.0
    return u


def constructed_llama(tok, facts: dict[int, int] | None = None):
    """2-block Llama: attention writes nothing (o_proj = 0); block 0's MLP maps subject i's key a e_i to
    C_VAL * u_{facts[i]}; block 1's MLP reads the same keys and writes nothing; the head reads u_j as OBJECTS[j]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    facts = facts if facts is not None else {i: i for i in range(len(SUBJECTS))}
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-8,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    a = key_scale()
    with torch.no_grad():
        m.model.embed_tokens.weight.zero_()
        m.lm_head.weight.zero_()
        for i, s in enumerate(SUBJECTS):
            m.model.embed_tokens.weight[tok(s)["input_ids"][0], i] = 1.0
        for j, o in enumerate(OBJECTS):
            m.lm_head.weight[tok(o)["input_ids"][0]] = 10.0 * obj_dir(j)
        for blk in m.model.layers:
            blk.self_attn.o_proj.weight.zero_()
            for p in (blk.mlp.gate_proj.weight, blk.mlp.up_proj.weight, blk.mlp.down_proj.weight):
                p.zero_()
            for i in range(len(SUBJECTS)):
                blk.mlp.gate_proj.weight[i, i] = GATE
                blk.mlp.up_proj.weight[i, i] = 1.0
        for i, j in facts.items():
            m.model.layers[0].mlp.down_proj.weight[:, i] = C_VAL / a * obj_dir(j)
    m.tokenizer = tok
    return m


def tiny_llama(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a head that can be confident (random init keeps every logit near 0)
        m.lm_head.weight.mul_(HEAD_SCALE)
    m.tokenizer = tok
    return m


def tiny_gpt2(tok, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=3, n_embd=48, n_head=4, vocab_size=len(tok), n_positions=64, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # tied head: scale the embedding so the head can be confident
        m.transformer.wte.weight.mul_(HEAD_SCALE)
    m.tokenizer = tok
    return m


def stats_text(subjects=SUBJECTS, repeat: int = 6) -> list[str]:
    """A text sample in which each listed subject occurs (for the key second moment)."""
    return [" ".join(f"capital of{s} is" for s in subjects) * repeat]
