"""Every conversion layout against the independent reference (tests/reference/differential_transformer.py) with the
negative branch live — mix = 1, non-trivial λ vectors, negative q/k weights that differ from the positive ones (DIFF
V2: random lambda_proj and perturbed odd query heads) — and against the stock original at mix = 0; on real text (the
license files, character-tokenized), as a left-padded batch and as packed documents, in float64 and fp32.

Tolerances, by dtype: float64 1e-5 — transformers' stock modules compute in fp32 even in a float64 model (RMSNorm
casts its input to fp32, the RoPE tables are built in fp32), which leaves ~5e-7 on these models against the
reference's float64 throughout; fp32 1e-4 (netmorph's verification tolerance; measured ~2e-6). The faults this file
is for (a flipped λ sign, a mask or RoPE position dropped in one branch) move the logits by more than 1e-2, which the
control in each case checks (the switched-on model is that far from the original).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.family_models import save_family_model
from tests.helpers import convert, load, save_char_tokenizer, save_tiny_model
from tests.reference.differential_transformer import paper_lambda_init, reference_logits

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}
TEXTS = [Path("/usr/share/common-licenses/Apache-2.0"), Path("/usr/share/common-licenses/GPL-3")]

SOURCES = {
    # 6 query / 2 KV heads (GQA, even: the split layout applies), q/k/v/o biases
    "llama": lambda d: save_tiny_model(d, "llama", num_attention_heads=6, num_key_value_heads=2, head_dim=8),
    # a sliding window of 7 on every layer, shorter than the texts
    "mistral": lambda d: save_tiny_model(d, "mistral", num_attention_heads=6, num_key_value_heads=2, head_dim=8),
    # q/k/v biases, a window on one layer of two
    "qwen2": lambda d: save_tiny_model(d, "qwen2"),
    # partial rotary (half of each head), fused qkv and gate_up in the source, a window on every layer
    "phi3": lambda d: save_family_model(d, "phi3"),
}
LAYOUTS = {"doubled": {}, "doubled+sublayer-norm": {"sublayer_norm": True}, "split": {"split_heads": True},
           "v2": {"variant": "v2"}, "lambda-zero": {"lambda_start": "zero"}}
CASES = [(family, layout) for family in SOURCES for layout in LAYOUTS
         if not (family == "qwen2" and layout.startswith("split"))]  # qwen2's tiny config has 9 / 3 heads


def real_text_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two real texts of different lengths, left-padded, with their positions and validity."""
    rows = [tokenizer(path.read_text()[:2000]).input_ids[:n] for path, n in zip(TEXTS, (40, 26))]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        valid[row, width - len(tokens):] = 1
    return {"input_ids": ids, "valid": valid, "positions": (valid.cumsum(-1) - 1).clamp(min=0)}


def packed_documents(tokenizer) -> dict[str, torch.Tensor]:
    """Three real-text documents packed in one row: positions restart at each, documents numbered."""
    pieces = [tokenizer(path.read_text()[start:start + 300]).input_ids[:n]
              for path, start, n in ((TEXTS[0], 0, 12), (TEXTS[1], 500, 15), (TEXTS[0], 900, 9))]
    return {"input_ids": torch.tensor([sum(pieces, [])]),
            "positions": torch.cat([torch.arange(len(p)) for p in pieces])[None],
            "documents": torch.cat([torch.full((len(p),), k) for k, p in enumerate(pieces)])[None]}


def switch_on(model, seed: int = 0) -> None:
    """The negative branch live: mix = 1 and λ vectors N(0, 0.3) (λ ≠ 0); negative q/k rows moved away from
    anything the positive ones hold. DIFF V2: lambda_proj N(0, 1) and the odd (negative) query heads perturbed."""
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor, scale):
        return scale * torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)

    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            if attention.layout == "v2":
                attention.lambda_proj.weight.copy_(noise(attention.lambda_proj.weight, 1.0))
                pairs = attention.q_proj.weight.view(-1, 2, attention.head_dim, attention.q_proj.weight.shape[1])
                pairs[:, 1] += noise(pairs[:, 1], 0.3)
                continue
            attention.mix.fill_(1.0)
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(attention, name).copy_(noise(getattr(attention, name), 0.3))
            if attention.layout == "doubled":
                for projection in (attention.q_proj, attention.k_proj):
                    negative = projection.weight[projection.weight.shape[0] // 2:]
                    negative += noise(negative, 0.3)


def run_model(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], attention_mask=batch.get("valid"), position_ids=batch["positions"],
                     use_cache=False).logits


def run_reference(model, batch: dict) -> torch.Tensor:
    config = model.config.to_dict()
    return reference_logits(model.state_dict(), config, batch["input_ids"], batch["positions"],
                            valid=batch.get("valid"), documents=batch.get("documents"))


def max_valid_diff(a: torch.Tensor, b: torch.Tensor, batch: dict) -> float:
    valid = batch.get("valid", torch.ones(a.shape[:2], dtype=torch.long)).bool()
    return (a - b)[valid].abs().max().item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    sources = {family: save_char_tokenizer(make(root / family)) for family, make in SOURCES.items()}
    converted = {(family, layout): convert(sources[family], root / f"{family}-{layout}", **LAYOUTS[layout]).output_dir
                 for family, layout in CASES}
    return sources, converted


@pytest.mark.parametrize("family", SOURCES)
def test_the_reference_reproduces_the_stock_source_models(checkpoints, family):
    """The reference itself, against transformers' own Llama / Mistral / Qwen2 / Phi-3 (float64)."""
    from transformers import AutoTokenizer

    sources, _ = checkpoints
    # sdpa: transformers' eager softmax runs in fp32 even for float64, where a padded row's finfo.min mask becomes −inf
    model = load(sources[family], "sdpa").double()
    tokenizer = AutoTokenizer.from_pretrained(str(sources[family]))
    for batch in (real_text_batch(tokenizer), packed_documents(tokenizer)):
        assert max_valid_diff(run_model(model, batch), run_reference(model, batch), batch) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "fp32"])
@pytest.mark.parametrize("family,layout", CASES)
def test_every_layout_with_the_negative_branch_live_matches_the_reference(checkpoints, family, layout, dtype):
    from transformers import AutoTokenizer

    sources, converted = checkpoints
    tokenizer = AutoTokenizer.from_pretrained(str(sources[family]))
    for backend in ("eager", "sdpa"):
        model = load(converted[family, layout], backend).to(dtype)
        switch_on(model)
        for batch in (real_text_batch(tokenizer), packed_documents(tokenizer)):
            ours, reference = run_model(model, batch), run_reference(model, batch)
            assert max_valid_diff(ours, reference, batch) <= TOLERANCE[dtype], (backend, batch.keys())
            original = load(sources[family], "sdpa").to(dtype)  # stock eager gives NaN in float64 (fp32 softmax)
            assert max_valid_diff(ours, run_model(original, batch), batch) > 1e-2, "the negative branch is not live"


@pytest.mark.parametrize("family,layout", [case for case in CASES if case[1] in ("doubled", "v2", "lambda-zero")])
def test_exact_layouts_at_mix_zero_match_the_stock_original_and_the_reference(checkpoints, family, layout):
    """As written (mix = 0; V2's λ = 0.5 pairs): the stock original's logits, and the reference's, in float64."""
    from transformers import AutoTokenizer

    sources, converted = checkpoints
    tokenizer = AutoTokenizer.from_pretrained(str(sources[family]))
    model = load(converted[family, layout], "sdpa").double()
    original = load(sources[family], "sdpa").double()
    for batch in (real_text_batch(tokenizer), packed_documents(tokenizer)):
        ours = run_model(model, batch)
        assert max_valid_diff(ours, run_model(original, batch), batch) <= 1e-10  # the same computation
        assert max_valid_diff(ours, run_reference(model, batch), batch) <= TOLERANCE[torch.float64]


def test_converted_lambda_init_is_the_papers(checkpoints):
    _, converted = checkpoints
    state = load_file(converted["llama", "doubled"] / "model.safetensors")
    for layer in range(2):
        assert state[f"model.layers.{layer}.self_attn.lambda_init"].item() == pytest.approx(paper_lambda_init(layer))
