"""`grow` on tiny random models of every supported family, loaded fresh from disk with the stock class.

Checkpoints are float64 so the figure is the recipe's own error: max |Δlogit| ≤ 1e-5 (float64; LayerNorm families
come out near 1e-14, RMSNorm/RoPE families near 1e-6 because transformers computes those in float32 internally).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from netmorph.errors import NetmorphError
from tests.grow_helpers import grow_tiny, save_tiny
from tests.helpers import random_ids
from tests.test_cli_errors import assert_clean_error, run_cli

pytestmark = pytest.mark.compat  # also run against the oldest and newest transformers (tests/compat.py)

CASES = {
    "llama": [dict(num_layers=4), dict(num_layers=5, new_layers_at="interleave"), dict(intermediate_size=80),
              dict(num_attention_heads=12, num_key_value_heads=4), dict(num_key_value_heads=9), dict(head_dim=10),
              dict(head_dim=16), dict(hidden_size=45), dict(hidden_size=48, num_attention_heads=12, num_key_value_heads=4),
              dict(num_layers=3, intermediate_size=64, num_attention_heads=18, num_key_value_heads=6, head_dim=12,
                   hidden_size=54, new_layers_at="0")],
    "mistral": [dict(hidden_size=40), dict(num_attention_heads=6, num_key_value_heads=3), dict(head_dim=14),
                dict(num_layers=3, intermediate_size=50, num_key_value_heads=4, head_dim=16, hidden_size=44)],
    "qwen2": [dict(num_layers=4, new_layers_at="interleave"), dict(hidden_size=48), dict(head_dim=12),
              dict(num_key_value_heads=6)],
    "stablelm": [dict(hidden_size=80), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
                 dict(num_key_value_heads=4), dict(num_layers=3, intermediate_size=128)],
    "gpt_neox": [dict(hidden_size=80), dict(num_attention_heads=6, hidden_size=96),
                 dict(num_layers=3, intermediate_size=100, head_dim=20, hidden_size=80)],
    "phi3": [dict(hidden_size=64), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=72),
             dict(num_key_value_heads=4, num_layers=3, intermediate_size=80)],
    "gemma": [dict(hidden_size=64), dict(head_dim=24), dict(head_dim=32),
              dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=60, head_dim=20, num_layers=3)],
}
PARAMS = [pytest.param(family, options, id=f"{family}-{i}") for family, cases in CASES.items()
          for i, options in enumerate(cases)]


def load64(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sources")
    return {family: save_tiny(root / family, family, dtype=torch.float64) for family in CASES}


@pytest.mark.parametrize("family, options", PARAMS)
def test_grown_tiny_model_is_exact(sources, tmp_path, family, options):
    result = grow_tiny(sources[family], tmp_path / "grown", **options)
    original, grown = load64(sources[family]), load64(tmp_path / "grown")
    assert type(grown) is type(original) and type(grown).__module__.startswith(f"transformers.models.{family}.")
    ids = random_ids()
    with torch.no_grad():
        diff = (original(ids).logits - grown(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert grown.config.num_hidden_layers == result.plan.target.layers
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in original.parameters())


def test_qwen2_layer_types_follow_the_new_layers(sources, tmp_path):
    original = load64(sources["qwen2"]).config.layer_types
    grown = grow_tiny(sources["qwen2"], tmp_path / "g", num_layers=4, new_layers_at="0,1").config.layer_types
    assert grown == [original[0], original[0], original[1], original[1]]


def text_ids(vocab_size=256, length=256):
    from netmorph.sources import default_texts

    return torch.tensor([list(next(iter(default_texts().values())).encode()[:length])]) % vocab_size


def test_stablelm_article_hidden_growth_keeps_the_loss(tmp_path):
    """The article grew StableLM-2-1.6B's hidden size 2048 → 2560 (32 heads, head_dim 64 → 80) and ended at +0.5%
    loss. Same model shape in small (LayerNorm, partial rotary 0.25, q/k/v biases, KV heads = heads, untied head),
    same ratio 64 → 80, fp32 checkpoint, real text: the loss does not move. Zero-fill instead of mean-fill does."""
    source = save_tiny(tmp_path / "stablelm", "stablelm", vocab_size=256, num_key_value_heads=4)
    grow_tiny(source, tmp_path / "grown", hidden_size=80)
    original = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    grown = AutoModelForCausalLM.from_pretrained(str(tmp_path / "grown"), dtype=torch.float32).eval()
    assert grown.config.hidden_size == 80
    assert grown.model.layers[0].self_attn.head_dim == 20 and grown.model.layers[0].self_attn.rotary_ndims == 4
    ids = text_ids()
    with torch.no_grad():
        loss, grown_loss = original(ids, labels=ids).loss.item(), grown(ids, labels=ids).loss.item()
        assert abs(grown_loss - loss) / loss <= 1e-5, (loss, grown_loss)
        for module in (grown.model.embed_tokens, *(l.self_attn.o_proj for l in grown.model.layers),
                       *(l.mlp.down_proj for l in grown.model.layers)):
            if module is grown.model.embed_tokens:
                module.weight[:, 64:] = 0
            else:
                module.weight[64:] = 0
        zero_fill_loss = grown(ids, labels=ids).loss.item()
    assert abs(zero_fill_loss - loss) / loss > 1e-3, (loss, zero_fill_loss)


# ── constraints checked before any work: one line, exit 2, nothing written ──────────────────────────────────────


def test_unsupported_family_names_the_supported_ones(tmp_path):
    OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=50,
                             word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    out = tmp_path / "out"
    assert_clean_error(run_cli("grow", tmp_path / "opt", "-o", out, "--num-layers", "2"), "'opt'",
                       "falcon, gemma, gemma2, gemma3_text, gpt2, gpt_neox, gpt_oss, granite, llama, ministral, mistral, "
                       "mixtral, olmo2, olmo3, phi3, qwen2, qwen3, qwen3_moe, smollm3, stablelm", output=out)


@pytest.mark.parametrize(
    "family, args, words",
    [
        ("llama", ["--hidden-size", "40"], ["hidden % heads", "e.g. 45"]),
        ("llama", ["--hidden-size", "48"], ["--num-attention-heads one of [12, 24, 48]"]),
        ("llama", ["--head-dim", "9"], ["odd"]),
        ("llama", ["--num-layers", "1"], ["grow only", "≥ 2"]),
        ("llama", ["--num-key-value-heads", "4"], ["9 query heads cannot be split into 4 KV heads"]),
        ("llama", ["--num-layers", "4", "--new-layers-at", "0"], ["lists 1 positions but 2 layers are new"]),
        ("llama", ["--num-layers", "4", "--new-layers-at", "0,7"], ["7 is not a source layer"]),
        ("llama", ["--seed", "3"], ["nothing to grow"]),
        ("stablelm", ["--hidden-size", "70"], ["head_dim = hidden / heads", "[10, 14, 70]", "e.g. 72"]),
        ("stablelm", ["--num-attention-heads", "6"], ["--hidden-size 96"]),
        ("gpt_neox", ["--num-key-value-heads", "6"], ["one KV head per query head"]),
        ("mistral", ["--num-attention-heads", "6", "--num-key-value-heads", "3", "--head-dim", "13"], ["odd"]),
    ],
)
def test_invalid_targets_are_refused_with_a_proposal(sources, tmp_path, family, args, words):
    out = tmp_path / "out"
    assert_clean_error(run_cli("grow", sources[family], "-o", out, "--no-verify", *args), *words, output=out)


def test_per_head_qk_norms_suggest_other_growth(tmp_path):
    source = save_tiny(tmp_path / "qk", "stablelm", qk_layernorm=True)
    out = tmp_path / "out"
    assert_clean_error(run_cli("grow", source, "-o", out, "--head-dim", "20", "--hidden-size", "80"),
                       "per-head q/k norms", "--num-layers", output=out)
    grow_tiny(source, tmp_path / "deeper", num_layers=3, intermediate_size=128)  # what it suggests works
    original, grown = load64(source), load64(tmp_path / "deeper")
    with torch.no_grad():
        assert (original(random_ids()).logits - grown(random_ids()).logits.to(torch.float64)).abs().max() <= 1e-5


def test_rope_type_whose_frequencies_depend_on_head_dim_is_refused(tmp_path):
    rope = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    source = save_tiny(tmp_path / "yarn", "llama", rope_parameters=rope)
    with pytest.raises(NetmorphError, match="rope_type 'yarn'.*grow heads instead"):
        grow_tiny(source, tmp_path / "out", head_dim=10)
    grow_tiny(source, tmp_path / "ok", num_attention_heads=12, num_key_value_heads=4)


@pytest.mark.real_model  # borrows the bundled SmolLM2 tokenizer
def test_cli_grows_verifies_and_writes_a_model_card(smollm2_dir, tmp_path):
    """The command end to end with its own verification (float64, the default texts, greedy text): a tiny Llama
    with SmolLM2's vocabulary and tokenizer, so verification runs on real text in seconds."""
    from transformers import AutoTokenizer

    source = save_tiny(tmp_path / "src", "llama", vocab_size=49152)
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(source)
    out = tmp_path / "grown"
    result = run_cli("grow", source, "-o", out, "--num-layers", "3", "--hidden-size", "45", "--head-dim", "10")
    assert result.exit_code == 0, result.output
    assert "(float64)" in result.output and "PASS" in result.output and "Generations match" in result.output
    card = (out / "README.md").read_text()
    assert "layers 2→3, head_dim 8→10, hidden 36→45" in card and "PASS" in card and "LlamaForCausalLM" in card
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".grown.")]
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.head_dim == 10
