"""The checkpoints the compatibility job (tests/compat.py) writes under one transformers release and loads under
another: every differential layout, stock-family conversions (a mixture of experts, attention sinks), the DiffLlama
export and three growths (depth growths of models with `layer_types` and `no_rope_layers`, which transformers 5.24
validates strictly).

    python -m tests.compat_checkpoints DIR     # writes DIR/<case>/source and DIR/<case>/output for every CASE
"""

import sys
from pathlib import Path

from netmorph.surgery.grow import grow
from netmorph.options import GrowOptions
from tests.family_models import save_family_model
from tests.grow_helpers import save_tiny as save_grow_source
from tests.helpers import convert, save_tiny_model
from tests.test_property_modes import pair_heads


def _paired_llama(directory: Path) -> Path:
    save_tiny_model(directory, "llama", num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    pair_heads(directory, heads=6, kv_heads=2, head_dim=8, layers=2)
    return directory


# case → (write the source into a dir, make the output from (source, output dir))
CASES = {
    "llama-doubled": (lambda d: save_tiny_model(d, "llama"), lambda s, o: convert(s, o)),
    "llama-split": (_paired_llama, lambda s, o: convert(s, o, split_heads=True)),
    "llama-v2": (lambda d: save_tiny_model(d, "llama"), lambda s, o: convert(s, o, variant="v2")),
    "qwen3-doubled": (lambda d: save_family_model(d, "qwen3"), lambda s, o: convert(s, o)),
    "gpt2-v2": (lambda d: save_family_model(d, "gpt2"), lambda s, o: convert(s, o, variant="v2")),
    "llama-diffllama": (lambda d: save_tiny_model(d, "llama"), lambda s, o: convert(s, o, export="diffllama")),
    "llama-grown": (lambda d: save_grow_source(d, "llama", embed_shift=0.0),
                    lambda s, o: grow(str(s), o, GrowOptions.build(verify=False, num_layers=3, hidden_size=48,
                                                                   num_attention_heads=12, num_key_value_heads=4))),
    "qwen3-grown-depth": (lambda d: save_family_model(d, "qwen3"),
                          lambda s, o: grow(str(s), o, GrowOptions.build(verify=False, num_layers=4))),
    # issue 21: per-expert tensors fused on load by each release's own conversions; sinks; NoPE layers
    "mixtral-doubled": (lambda d: save_family_model(d, "mixtral"), lambda s, o: convert(s, o)),
    "gpt_oss-v2": (lambda d: save_family_model(d, "gpt_oss"), lambda s, o: convert(s, o, variant="v2")),
    "smollm3-grown-depth": (lambda d: save_family_model(d, "smollm3"),
                            lambda s, o: grow(str(s), o, GrowOptions.build(verify=False, num_layers=3))),
}


def write(directory: Path, case: str) -> tuple[Path, Path]:
    """Write CASES[case] under `directory`: (source dir, output dir)."""
    make_source, make_output = CASES[case]
    source, output = directory / case / "source", directory / case / "output"
    make_source(source)
    make_output(source, output)
    return source, output


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for name in CASES:
        write(root, name)
    print(f"wrote {len(CASES)} cases under {root}")
