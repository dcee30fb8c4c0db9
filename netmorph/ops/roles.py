"""The canonical roles of a decoder layer's tensors — the names the math in netmorph/ops works with — and the *space*
each reads and writes: the vocabulary growth needs (mergekit's idea, https://github.com/arcee-ai/mergekit: a weight
that writes the residual stream must keep its invariant, a weight that reads it may get free new input columns).
netmorph/arch/families.py maps each family's stored tensor names to these roles.
"""

# role → (space it reads, space it writes). "residual": the hidden stream (hidden_size); "query"/"key"/"value":
# per-head projections (heads × head_dim, kv_heads × head_dim); "mlp": the intermediate activations.
ROLE_SPACES = {
    "q": ("residual", "query"), "k": ("residual", "key"), "v": ("residual", "value"),
    "qkv": ("residual", "query+key+value"),  # fused; split per the family's qkv_layout
    "o": ("value", "residual"),
    "gate": ("residual", "mlp"), "up": ("residual", "mlp"), "gate_up": ("residual", "mlp+mlp"),
    "down": ("mlp", "residual"),
    # norms on the residual stream: pre-norms feed a sub-layer; post-norms (Gemma2/3, OLMo2) scale its output
    "attn_norm": ("residual", "residual"), "mlp_norm": ("residual", "residual"),
    "attn_post_norm": ("residual", "residual"), "mlp_post_norm": ("residual", "residual"),
    # q/k norms: per head over head_dim (Qwen3, Gemma3), or over the whole projection (OLMo2)
    "q_norm": ("query", "query"), "k_norm": ("key", "key"),
    # Falcon new_decoder_architecture: two parallel pre-norms
    "ln_attn": ("residual", "residual"), "ln_mlp": ("residual", "residual"),
}
READERS = tuple(r for r, (reads, writes) in ROLE_SPACES.items() if reads == "residual" and writes != "residual")
WRITERS = tuple(r for r, (reads, writes) in ROLE_SPACES.items() if writes == "residual" and reads != "residual")
RESIDUAL_NORMS = tuple(r for r, (reads, writes) in ROLE_SPACES.items() if reads == writes == "residual")
