"""The mask matrix: a converted model (λ switched on, so both branches matter) on every CPU backend, each case
against a float64 reference that gets an explicit boolean mask — plus the raw attention module against a pure
float64 differential-attention function.

Reference: the same weights in float64 with eager attention and a hand-built additive 4-D mask; for the raw module,
`reference_attention` below (explicit `repeat_interleave` GQA grouping, explicit boolean mask, no transformers code).
"""

import pytest
import torch

from tests.helpers import cache_argument, convert, load, random_ids, save_tiny_model

pytestmark = pytest.mark.compat  # also run against the oldest and newest transformers (tests/compat.py)

BACKENDS = ["eager", "sdpa", "flex_attention"]
TOL = 2e-5
WINDOW = 7  # Mistral's sliding window in the tiny config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Tiny Llama (full attention) and Mistral (sliding window) conversions in the doubled, split and DIFF V2 layouts."""
    root = tmp_path_factory.mktemp("masks")
    paths = {}
    for family in ("llama", "mistral"):
        save_tiny_model(root / family, family, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
        paths[family, "doubled"] = convert(root / family, root / f"{family}-doubled").output_dir
        paths[family, "split"] = convert(root / family, root / f"{family}-split", split_heads=True).output_dir
        paths[family, "v2"] = convert(root / family, root / f"{family}-v2", variant="v2").output_dir
    return paths


def switched_on(path, backend, dtype=torch.float32):
    """The converted model with mix = 1 (λ ≠ 0): the negative branch contributes, so its masking is tested too.
    DIFF V2 has no mix: its negative (odd) query heads are perturbed away from their mirrored pairs and lambda_proj
    gets random weights, so λ varies per token and head (the same numbers on every call)."""
    model = load(path, backend).to(dtype)
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        attention = layer.self_attn
        if attention.layout != "v2":
            attention.mix.fill_(1.0)
            continue
        with torch.no_grad():
            lam = attention.lambda_proj.weight
            lam.copy_(torch.randn(lam.shape, generator=generator))
            pairs = attention.q_proj.weight.view(-1, 2, attention.head_dim, lam.shape[1])
            pairs[:, 1] += 0.3 * torch.randn(pairs[:, 1].shape, generator=generator)
    return model


def allowed_matrix(positions_valid: torch.Tensor, documents: torch.Tensor | None = None, window: int | None = None,
                   prefix: int = 0) -> torch.Tensor:
    """(B, T, T) boolean: query i may attend key j. Causal, keys must be valid, same document, within the window;
    the first `prefix` positions attend to each other bidirectionally (prefix-LM)."""
    batch, length = positions_valid.shape
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i) | ((i < prefix) & (j < prefix))
    allowed = allowed[None].expand(batch, -1, -1) & positions_valid[:, None, :]
    if documents is not None:
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


@torch.no_grad()
def reference_logits(path, input_ids, allowed: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    model = switched_on(path, "eager", torch.float64)
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    # A 4-D mask is used as given by every layer (the window, when there is one, is in `allowed`).
    return model(input_ids, attention_mask=additive[:, None], position_ids=position_ids, use_cache=False).logits


def sliding_window_of(family):
    return WINDOW if family == "mistral" else None


LAYOUTS = ("doubled", "split", "v2")
CASES = [(family, layout, backend) for family in ("llama", "mistral") for layout in LAYOUTS for backend in BACKENDS]


@pytest.mark.parametrize("family,layout,backend", CASES)
def test_square_causal_matches_the_reference_and_ignores_the_future(converted, family, layout, backend):
    path = converted[family, layout]
    ids = random_ids(batch=2, length=16)
    positions = torch.arange(16)[None].expand(2, -1)
    model = switched_on(path, backend)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        changed = ids.clone()
        changed[:, 10:] = random_ids(batch=2, length=6, seed=5)
        early = model(changed, use_cache=False).logits[:, :10]
    expected = reference_logits(path, ids, allowed_matrix(torch.ones(2, 16, dtype=torch.bool), window=sliding_window_of(family)), positions)
    assert (logits.double() - expected).abs().max().item() <= TOL
    assert torch.equal(early, logits[:, :10]) or (early - logits[:, :10]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family,layout,backend", CASES)
def test_padding_left_right_and_all_padding_row_equal_each_sequence_alone(converted, family, layout, backend):
    path = converted[family, layout]
    model = switched_on(path, backend)
    length = 14
    lengths = {"left": 9, "right": 6}
    seqs = {side: random_ids(batch=1, length=n, seed=n)[0] for side, n in lengths.items()}
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    ids[0, length - lengths["left"]:], mask[0, length - lengths["left"]:] = seqs["left"], 1
    ids[1, : lengths["right"]], mask[1, : lengths["right"]] = seqs["right"], 1
    # row 2: all padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        alone = {side: model(seq[None], use_cache=False).logits[0] for side, seq in seqs.items()}
    assert torch.isfinite(logits).all(), "NaN/Inf in outputs (all-padding row?)"
    assert (logits[0, length - lengths["left"]:] - alone["left"]).abs().max().item() <= TOL
    assert (logits[1, : lengths["right"]] - alone["right"]).abs().max().item() <= TOL


@pytest.mark.parametrize("family,layout,backend", CASES)
def test_packed_documents_via_position_ids_with_and_without_cache(converted, family, layout, backend):
    path = converted[family, layout]
    model = switched_on(path, backend)
    sizes = [5, 8, 3]
    ids = random_ids(batch=1, length=sum(sizes), seed=3)
    position_ids = torch.cat([torch.arange(n) for n in sizes])[None]
    documents = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])[None]
    allowed = allowed_matrix(torch.ones(1, sum(sizes), dtype=torch.bool), documents, sliding_window_of(family))
    expected = reference_logits(path, ids, allowed, position_ids)
    for use_cache in (False, True):
        with torch.no_grad():
            logits = model(ids, position_ids=position_ids, use_cache=use_cache).logits
        assert (logits.double() - expected).abs().max().item() <= TOL, f"use_cache={use_cache}"


@pytest.mark.parametrize("family,layout,backend", CASES)
def test_custom_4d_masks_block_diagonal_and_prefix_lm(converted, family, layout, backend):
    path = converted[family, layout]
    model = switched_on(path, backend)
    length = 12
    ids = random_ids(batch=1, length=length, seed=7)
    positions = torch.arange(length)[None]
    documents = (torch.arange(length) >= 5).long()[None]
    valid = torch.ones(1, length, dtype=torch.bool)
    for allowed in (allowed_matrix(valid, documents), allowed_matrix(valid, prefix=4)):
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        expected = reference_logits(path, ids, allowed, positions)
        with torch.no_grad():
            logits = model(ids, attention_mask=additive, position_ids=positions, use_cache=False).logits
        assert (logits.double() - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("family,layout,backend", CASES)
def test_prefill_then_decode_one_and_several_equals_one_forward(converted, family, layout, backend):
    path = converted[family, layout]
    model = switched_on(path, backend)
    ids = random_ids(batch=2, length=20, seed=11)  # longer than Mistral's window of 7
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :12], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for start, stop in ((12, 13), (13, 17), (17, 18), (18, 20)):  # decode 1, then k > 1, …
            out = model(ids[:, start:stop], **cache_argument(model, cache), use_cache=True)
            pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["doubled", "v2"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_masks_give_no_nan(converted, backend, dtype, layout):
    """fp32 masks (finfo.min) cast to half overflow to −inf; an all-masked row must still give finite outputs."""
    if backend == "flex_attention" and not torch.cuda.is_available():
        pytest.skip("torch 2.13's CPU FlexAttention kernel corrupts memory with a half-precision tensor mask "
                    "('double free or corruption', also for stock Llama); the GPU run covers it")
    model = switched_on(converted["llama", layout], backend, dtype)
    length = 10
    allowed = allowed_matrix(torch.ones(1, length, dtype=torch.bool))
    allowed[0, 3, :] = False  # a query that may attend nothing
    for fill in (torch.finfo(torch.float32).min, float("-inf")):
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, fill)[:, None].to(dtype)
        with torch.no_grad():
            logits = model(random_ids(batch=1, length=length), attention_mask=mask, use_cache=False).logits
        assert torch.isfinite(logits).all(), f"fill={fill}"


@pytest.mark.parametrize("layout", ["split", "v2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_keys_get_exactly_zero_gradient_and_no_nan(converted, backend, layout):
    if backend == "flex_attention":
        pytest.skip("torch's FlexAttention has no backward on CPU (NotImplementedError); the GPU run covers it")
    model = switched_on(converted["mistral", layout], backend)
    ids = random_ids(batch=3, length=12, seed=2)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[2] = 0  # all padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    (logits * mask[..., None]).sum().backward()  # loss on real tokens only
    assert torch.isfinite(embeds.grad).all()
    assert embeds.grad[0, :5].abs().max().item() == 0.0 and embeds.grad[2].abs().max().item() == 0.0
    assert embeds.grad[0, 5:].abs().max().item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def reference_attention(query, key, value, lam, allowed, scaling, layout):
    """Pure float64 differential attention. query (B, 2H|H, T, d), key (B, 2G|G, S, d), value (B, G, S, d);
    allowed (T, S) boolean; lam a scalar, or (B, T, H) for DIFF V2 (pairs 2j / 2j + 1 over the same keys).
    Fully masked rows give 0."""
    query, key, value = query.double(), key.double(), value.double()
    if layout == "v2":
        q_pos, q_neg, k_pos, k_neg = query[:, 0::2], query[:, 1::2], key, key
        lam = lam.double().transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
    else:
        q_pos, q_neg = query.chunk(2, dim=1)
        k_pos, k_neg = key.chunk(2, dim=1)
    if layout == "split":
        v_first, v_second = value.chunk(2, dim=1)
        value = torch.cat([v_first, v_second], dim=-1)
    out = 0
    for sign, q, k in ((1.0, q_pos, k_pos), (-lam, q_neg, k_neg)):
        group = q.shape[1] // k.shape[1]
        k_rep, v_rep = k.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        scores = (q @ k_rep.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
        out = out + sign * (probs @ v_rep)
    return out.transpose(1, 2)  # (B, T, heads, value_dim)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_attention_module_matches_the_float64_reference(converted, layout, backend):
    """The attention module alone, handed q/k/v through a patched projection, with GQA 6 query / 2 KV heads."""
    model = switched_on(converted["llama", layout], backend)
    attention = model.model.layers[1].self_attn
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9)[None].expand(2, -1)
    cos_sin = model.model.rotary_emb(hidden, position_ids=positions)
    allowed = allowed_matrix(torch.ones(1, 9, dtype=torch.bool), prefix=3)[0]
    additive = torch.zeros(9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None].expand(2, 1, 9, 9).contiguous()
    with torch.no_grad():
        query, key, value = attention._project(hidden, cos_sin)
        out, _ = attention(hidden, cos_sin, attention_mask=additive)
        lam = (torch.sigmoid(attention.lambda_proj(hidden)) if layout == "v2" else attention.lambda_full().item())
        expected = reference_attention(query, key, value, lam, allowed, attention.scaling, layout)
        expected = attention.o_proj(expected.reshape(2, 9, -1).float())
    assert (out - expected).abs().max().item() <= TOL


def test_custom_attention_function_without_mask_function_is_refused_not_unmasked(converted):
    """transformers hands an attention function registered without a mask function no mask at all."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register("netmorph_test_sdpa", sdpa_attention_forward)
    try:  # the registries are global: leave them as they were for the tests that run after this one
        model = switched_on(converted["llama", "doubled"], "sdpa")
        model.set_attn_implementation("netmorph_test_sdpa")
        ids = random_ids(batch=2, length=8)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, :3] = 0
        with pytest.raises(ValueError, match="has no mask function"):
            model(ids, attention_mask=mask, use_cache=False)

        AttentionMaskInterface.register("netmorph_test_sdpa", sdpa_mask)  # with a mask function it is the sdpa path
        with torch.no_grad():
            custom = model(ids, attention_mask=mask, use_cache=False).logits
            model.set_attn_implementation("sdpa")
            reference = model(ids, attention_mask=mask, use_cache=False).logits
        assert (custom - reference)[mask.bool()].abs().max().item() <= 1e-6
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop("netmorph_test_sdpa", None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop("netmorph_test_sdpa", None)
