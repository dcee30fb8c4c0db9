"""Fuzz the option and YAML parsers: any input gives a valid options object or one NetmorphError of one line —
never another exception type. And through the CLI: any flags against a missing SOURCE give exit status 2 and one
`error:` line; any flags against a real tiny source give a converted checkpoint (exit 0) or that one line."""

import math
import string
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netmorph.cli import main
from netmorph.errors import NetmorphError
from netmorph.options import ConvertOptions, TrainingYaml
from netmorph.sources import read_yaml

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FIELDS = list(ConvertOptions.model_fields)
YAML_KEYS = list(TrainingYaml.model_fields) + ["learning_rate", "plugins", "diff_attn_warmup_step", "base_modle"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.sampled_from(["5GB", "1.5 MiB", "paper", "zero", "0", "-1", "true"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                             max_size=3), max_leaves=6)


def assert_one_line(error: NetmorphError) -> None:
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, message


@settings(max_examples=300, **SETTINGS)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(string.ascii_lowercase + "_", min_size=1, max_size=12),
                       values, max_size=6))
def test_convert_options_from_any_dict(data):
    try:
        options = ConvertOptions.build(**data)
    except NetmorphError as e:
        assert_one_line(e)
        return
    assert isinstance(options, ConvertOptions)
    for name in ("negative_std", "lambda_std", "tolerance"):
        assert math.isfinite(getattr(options, name))  # inf/NaN never reach the conversion


keys = st.one_of(st.sampled_from(YAML_KEYS), st.text(max_size=15), st.integers(), st.none(), st.booleans())


@settings(max_examples=300, **SETTINGS)
@given(st.dictionaries(keys, values, max_size=6))
def test_training_yaml_from_any_mapping(data):
    try:
        settings_ = TrainingYaml.from_yaml(data, "train.yml")
    except NetmorphError as e:
        assert_one_line(e)
        return
    assert isinstance(settings_.base_model, str)


yaml_texts = st.one_of(
    st.text(max_size=200),
    st.dictionaries(keys, values, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=200, **SETTINGS)
@given(yaml_texts, st.booleans())
@example("base_model: x\nwhen: 2024-13-45\n", False)  # a date YAML parses but Python rejects
@example("", True)
@example("\xff\xfe", True)
def test_yaml_file_from_any_text(tmp_path, text, as_bytes):
    path = tmp_path / "train.yml"
    if as_bytes:
        path.write_bytes(text.encode("latin-1", errors="replace"))
    else:
        path.write_text(text, encoding="utf-8")
    try:
        TrainingYaml.from_yaml(read_yaml(path), path)
    except NetmorphError as e:
        assert_one_line(e)


flag_names = st.sampled_from(["--" + name.replace("_", "-") for name in FIELDS] + ["--no-verify", "--bogus", "-o"])
arguments = st.lists(st.one_of(flag_names, st.text(string.printable, max_size=8), st.sampled_from(["1e309", "nan"])),
                     max_size=6)


@settings(max_examples=150, **SETTINGS)
@given(arguments)
def test_cli_flags_from_any_argument_list(tmp_path, args):
    """Every flag combination against a SOURCE that does not exist: whatever goes wrong first is one line."""
    missing = str(tmp_path / "no-such-model")
    result = CliRunner().invoke(main, ["convert-diff-transformer", missing, *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not Path(missing).exists()


# Flags with values that parse, so that many combinations get past the parser and convert for real.
real_flags = st.lists(st.sampled_from([
    ["--split-heads"], ["--negative-init", "zero"], ["--negative-init", "mirror"], ["--sublayer-norm"], ["--variant", "v2"],
    ["--variant", "v1"], ["--lambda-start", "zero"], ["--negative-std", "0.5"], ["--lambda-std", "0"],
    ["--seed", "7"], ["--max-shard-size", "4KB"], ["--tolerance", "1e-3"], ["--export", "diffllama"], ["--no-verify"],
    ["--verify-mode", "layerwise"], ["--diffllama-anchor", "0"], ["--force"], ["--seed", "x"], ["--bogus"],
]), max_size=4).map(lambda groups: [flag for group in groups for flag in group])


@pytest.fixture(scope="module")
def real_source(tmp_path_factory):
    from tests.helpers import save_char_tokenizer, save_tiny_model

    return save_char_tokenizer(save_tiny_model(tmp_path_factory.mktemp("fuzz") / "src", "llama",
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                               hidden_size=32, num_hidden_layers=1))


@settings(max_examples=30, **SETTINGS)
@given(real_flags)
def test_cli_flags_on_a_real_tiny_source(real_source, tmp_path_factory, args):
    """Exit 0 with a checkpoint, or exit 2 with one `error:` line and nothing at the output path — never a traceback
    (catch_exceptions=False re-raises one), never exit 1 (every combination here is exact or reports)."""
    out = tmp_path_factory.mktemp("out") / "converted"
    result = CliRunner().invoke(main, ["convert-diff-transformer", str(real_source), "-o", str(out), *args],
                                catch_exceptions=False)
    if result.exit_code == 0:
        assert (out / "config.json").exists() and list(out.glob("*.safetensors")), result.output
        return
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists()


@pytest.mark.parametrize("old, mode", [("zero_init", "zero"), ("mirror_weights", "mirror")])
def test_the_old_negative_init_booleans_name_their_replacement(old, mode):
    from netmorph.options import ConvertOptions

    with pytest.raises(NetmorphError, match=f"^{old} was replaced by negative_init: use --negative-init {mode} "):
        ConvertOptions.build(**{old: True})
    assert ConvertOptions.build(**{old: False}).negative_init == "normal"
    assert ConvertOptions.build(negative_init=mode).negative_init == mode
