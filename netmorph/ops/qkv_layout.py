"""Fused QKV layouts as pure functions: the rows of a q/k/v projection, separate or in one fused tensor.

Notation: H query heads, G key/value heads (groups), r = H / G query heads per group, D = head_dim.
Every function works on the *row* axis (dim 0) of an `nn.Linear` weight `[out, in]` or of a bias `[out]`; a
Conv1D weight (GPT-2, stored `[in, out]`) is transposed by the caller before and after.

    separate     q [H·D], k [G·D], v [G·D]                      Llama q_proj / k_proj / v_proj
    sequential   [Q | K | V]                                      Phi-3 qkv_proj, GPT-2 c_attn, MPT, DBRX
    interleaved  per head [q_h | k_h | v_h]  (needs G == H)      GPT-NeoX, Bloom, Falcon (MHA)
    grouped      per KV group [q_g·r … q_g·r+r−1 | k_g | v_g]     Falcon new_decoder_architecture

Interleaved is grouped with G = H, and sequential equals grouped when G = 1 (Falcon-7B's multi_query), so the
byte layouts coincide there (`same_bytes`). Every conversion is a row permutation: exact, and undone by the
conversion back. The layouts are those of transformers' modeling files (https://github.com/huggingface/transformers,
src/transformers/models/): phi3/modeling_phi3.py (qkv_proj sliced [Q | K | V]), gpt2/modeling_gpt2.py (c_attn
`.split`), gpt_neox/modeling_gpt_neox.py (`view(..., H, 3·D)`), falcon/modeling_falcon.py (`_split_heads`).
"""

from dataclasses import dataclass

import torch

from netmorph.errors import NetmorphError

LAYOUTS = ("separate", "sequential", "interleaved", "grouped")
FUSED_LAYOUTS = ("sequential", "interleaved", "grouped")


@dataclass(frozen=True)
class Heads:
    """Head counts of one attention layer: `num_heads` query heads sharing `num_kv_heads` key/value heads. Raises
    NetmorphError when a count is below 1 or the query heads are not a multiple of the key/value heads."""

    num_heads: int
    num_kv_heads: int

    def __post_init__(self):
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise NetmorphError(
                f"{self.num_heads} query heads cannot share {self.num_kv_heads} key/value heads: the query heads "
                "must be a multiple of the key/value heads; fix num_key_value_heads in config.json"
            )

    @property
    def per_group(self) -> int:
        """r = H / G: query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def kind(self) -> str:
        """The attention kind: "MHA" (G = H), "MQA" (G = 1 < H) or "GQA" (any other G)."""
        return "MHA" if self.num_kv_heads == self.num_heads else "MQA" if self.num_kv_heads == 1 else "GQA"

    def head_dim(self, fused_rows: int) -> int:
        """D from the row count of a fused tensor ((H + 2G)·D rows). Raises NetmorphError when `fused_rows` is not a
        multiple of H + 2G."""
        slots = self.num_heads + 2 * self.num_kv_heads
        if fused_rows % slots:
            raise NetmorphError(
                f"a fused QKV tensor of {fused_rows} rows does not hold {self.num_heads} query and "
                f"{self.num_kv_heads} key/value heads of one size: the weights and config.json do not belong together"
            )
        return fused_rows // slots


def check_expressible(layout: str, heads: Heads) -> None:
    """Raises NetmorphError for a layout not in LAYOUTS, and for "interleaved" with G ≠ H: interleaved stores one k
    and one v per query head, so it cannot hold shared (GQA/MQA) key/value heads."""
    if layout not in LAYOUTS:
        raise NetmorphError(f"unknown QKV layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "interleaved" and heads.num_kv_heads != heads.num_heads:
        raise NetmorphError(
            f"the interleaved layout needs as many key/value heads as query heads, but this model has "
            f"{heads.num_heads} query and {heads.num_kv_heads} key/value heads ({heads.kind}): use --to grouped, "
            "which stores the same per-group order for shared key/value heads"
        )


def same_bytes(layout_a: str, layout_b: str, heads: Heads) -> bool:
    """Whether two fused layouts put every row in the same place for these head counts (an unknown name compares as
    itself)."""
    def canonical(layout):
        """The layout whose row order `layout` has for these head counts: interleaved and grouped are grouped, or
        sequential when G = 1; separate and sequential are themselves."""
        if layout in ("grouped", "interleaved"):  # interleaved = grouped with G = H
            return "sequential" if heads.num_kv_heads == 1 else "grouped"
        return layout

    return canonical(layout_a) == canonical(layout_b)


def fuse_sequential(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q `[H·D, ...]`, k `[G·D, ...]`, v `[G·D, ...]` → [Q | K | V] `[(H + 2G)·D, ...]`: all query rows, then all key
    rows, then all value rows (a new tensor; Phi-3 qkv_proj, GPT-2 c_attn, Falcon multi_query)."""
    return torch.cat([q, k, v], dim=0)


def split_sequential(fused: torch.Tensor, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[Q | K | V] rows → (q `[H·D, ...]`, k `[G·D, ...]`, v `[G·D, ...]`), views of `fused` in its dtype (Phi-3
    qkv_proj, GPT-2 c_attn after the transpose, Falcon multi_query). Raises NetmorphError when the row count is not a
    multiple of H + 2G."""
    d = heads.head_dim(fused.shape[0])
    return tuple(fused.split([heads.num_heads * d, heads.num_kv_heads * d, heads.num_kv_heads * d], dim=0))


def fuse_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads) -> torch.Tensor:
    """q `[H·D, ...]`, k/v `[G·D, ...]` → `[(H + 2G)·D, ...]`: per KV group g, the rows of its r query heads, then
    k_g, then v_g (Falcon new_decoder_architecture). Query head h belongs to group h // r (the mapping of HF
    `repeat_kv` and SDPA `enable_gqa`)."""
    g, d = heads.num_kv_heads, k.shape[0] // heads.num_kv_heads
    rest = q.shape[1:]
    groups = torch.cat([q.reshape(g, heads.per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)],
                       dim=1)  # (G, (r + 2)·D, ...)
    return groups.reshape(g * (heads.per_group + 2) * d, *rest)


def split_grouped(fused: torch.Tensor, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_grouped`: per KV group, r query heads, then k_g, then v_g → (q `[H·D, ...]`, k `[G·D,
    ...]`, v `[G·D, ...]`) in `fused`'s dtype (Falcon new_decoder_architecture `_split_heads`). Raises NetmorphError
    when the row count is not a multiple of H + 2G."""
    g, r, d = heads.num_kv_heads, heads.per_group, heads.head_dim(fused.shape[0])
    rest = fused.shape[1:]
    groups = fused.reshape(g, (r + 2) * d, *rest)
    q = groups[:, : r * d].reshape(heads.num_heads * d, *rest)
    k = groups[:, r * d : (r + 1) * d].reshape(g * d, *rest)
    v = groups[:, (r + 1) * d :].reshape(g * d, *rest)
    return q, k, v


def fuse_interleaved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Per head h: q_h, k_h, v_h (GPT-NeoX `view(..., H, 3·D)`), `[3·H·D, ...]`: the grouped layout with one query
    per group. Raises NetmorphError unless G == H."""
    check_expressible("interleaved", heads)
    return fuse_grouped(q, k, v, heads)


def split_interleaved(fused: torch.Tensor, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_interleaved` (GPT-NeoX `view(..., H, 3·D)`): per head q_h, k_h, v_h → (q, k, v), each
    `[H·D, ...]`. Raises NetmorphError unless G == H, or when the row count is not a multiple of 3H."""
    check_expressible("interleaved", heads)
    return split_grouped(fused, heads)


def fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, heads: Heads) -> torch.Tensor:
    """Separate q `[H·D, ...]`, k/v `[G·D, ...]` rows → one fused tensor `[(H + 2G)·D, ...]` in `layout` (one of
    FUSED_LAYOUTS), in the inputs' dtype. Raises NetmorphError when the row counts do not hold H and G heads of one
    size, when `layout` cannot hold these heads (`check_expressible`), or for a layout that is not fused."""
    _check_separate(q, k, v, heads)
    check_expressible(layout, heads)
    if layout == "sequential":
        return fuse_sequential(q, k, v)
    if layout == "interleaved":
        return fuse_interleaved(q, k, v, heads)
    if layout == "grouped":
        return fuse_grouped(q, k, v, heads)
    raise NetmorphError(f"{layout!r} is not a fused QKV layout: choose one of {', '.join(FUSED_LAYOUTS)}")


def split(fused: torch.Tensor, layout: str, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse`: a fused tensor `[(H + 2G)·D, ...]` in `layout` → (q, k, v), each contiguous, in its
    dtype. Raises NetmorphError for a layout that is not fused or cannot hold these heads, or a row count that is not
    a multiple of H + 2G."""
    check_expressible(layout, heads)
    if layout == "sequential":
        parts = split_sequential(fused, heads)
    elif layout == "interleaved":
        parts = split_interleaved(fused, heads)
    elif layout == "grouped":
        parts = split_grouped(fused, heads)
    else:
        raise NetmorphError(f"{layout!r} is not a fused QKV layout: choose one of {', '.join(FUSED_LAYOUTS)}")
    return tuple(part.contiguous() for part in parts)


def relayout(parts: tuple[torch.Tensor, ...], source: str, target: str, heads: Heads) -> tuple[torch.Tensor, ...]:
    """Rows of one projection (weight or bias) from `source` to `target` layout. `parts` is (q, k, v) for the
    separate layout and (fused,) otherwise; so is the result. Exact: a row permutation. Raises NetmorphError as
    `split` and `fuse` do."""
    check_expressible(target, heads)
    q, k, v = parts if source == "separate" else split(parts[0], source, heads)
    if target == "separate":
        return q, k, v
    return (fuse(q, k, v, target, heads),)


def _check_separate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads) -> None:
    rows_per_head = q.shape[0] // heads.num_heads
    if q.shape[0] % heads.num_heads or k.shape != v.shape or k.shape[0] != heads.num_kv_heads * rows_per_head:
        raise NetmorphError(
            f"q/k/v with {q.shape[0]}/{k.shape[0]}/{v.shape[0]} rows do not hold {heads.num_heads} query and "
            f"{heads.num_kv_heads} key/value heads of one size: the weights and config.json do not belong together"
        )
