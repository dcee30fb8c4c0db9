"""The README's bad-input table, row by row: each row runs the real CLI and asserts exit status 2, the exact
one-line error the README shows, and that nothing is left at the output path (no `.partial-*` temp dir either).

Each row is one `@row(input, message)` function that damages a fresh tiny Llama checkpoint (SRC) and returns the
command line. In `message`, SRC / OUT / PARENT stand for the paths of the row and N for any number; the same text
is what the README shows, and `test_readme_table_is_this_table` keeps the two identical.
"""

import ctypes
import itertools
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import netmorph
from netmorph.cli import main
from tests.helpers import load, max_logit_diff, random_ids, save_tiny_model

README = Path(__file__).parents[1] / "README.md"
REPO_ROOT = Path(netmorph.__file__).parents[1]
WEIGHTS = "model.safetensors"
CONVERT = "convert-diff-transformer"


@dataclass
class Row:
    name: str
    bad_input: str
    message: str
    build: object
    subprocess: bool = False  # needs its own process (resource limits, dropped capabilities)


ROWS: list[Row] = []


def row(bad_input: str, message: str, subprocess: bool = False):
    def register(build):
        ROWS.append(Row(build.__name__, bad_input, message, build, subprocess))
        return build

    return register


@dataclass
class Case:
    """What a row's build step sets up: the paths that stand for SRC / OUT / PARENT and what must be untouched."""

    tmp: Path
    src: Path
    out: Path

    @property
    def parent(self) -> Path:
        return self.out.parent


def rewrite_config(case: Case, **changes) -> None:
    config = json.loads((case.src / "config.json").read_text())
    config.update(changes)
    (case.src / "config.json").write_text(json.dumps(config))


def damage_tensor(case: Case, name: str, value: float) -> None:
    state = load_file(case.src / WEIGHTS)
    state[name][0, 0] = value
    save_file(state, case.src / WEIGHTS, metadata={"format": "pt"})


def split_into_two_shards(case: Case) -> dict:
    state = load_file(case.src / WEIGHTS)
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    (case.src / WEIGHTS).unlink()
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, case.src / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (case.src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def write_yaml(case: Case, text: str) -> Path:
    path = case.tmp / "train.yml"
    path.write_text(text.replace("SRC", str(case.src)))
    return path


class RunsCode:
    """A pickle that would run code when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_tiny_gguf(path: Path, tensor_type=None) -> Path:
    """A 1-layer Llama GGUF written with gguf's own writer; `tensor_type` gives blk.0.attn_q.weight a quantized type
    (its bytes zero) instead of F32."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    hidden, heads, kv_heads, ffn, vocab = 32, 4, 2, 64, 64
    head_dim = hidden // heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.attn_q.weight": (heads * head_dim, hidden),
              "blk.0.attn_k.weight": (kv_heads * head_dim, hidden), "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_output.weight": (hidden, heads * head_dim), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if tensor_type is not None and name == "blk.0.attn_q.weight":
            block, type_size = GGML_QUANT_SIZES[tensor_type]
            raw = np.zeros((shape[0], shape[1] // block * type_size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, rng.normal(0, 0.1, shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- the table ------------------------------------------------------------------------------------------------

@row("SOURCE that does not exist", "source SRC does not exist: pass a model directory, a .gguf file or a YAML config")
def missing_source(case):
    case.src = case.tmp / "nope"
    return [CONVERT, case.src, "-o", case.out]


@row("directory without config.json", "SRC is not a Hugging Face model directory: it has no config.json")
def no_config(case):
    (case.src / "config.json").unlink()
    return [CONVERT, case.src, "-o", case.out]


@row("config.json that is not JSON", "corrupt SRC/config.json: it is not valid JSON; re-download it")
def corrupt_config(case):
    (case.src / "config.json").write_text('{"model_type": "llama",')
    return [CONVERT, case.src, "-o", case.out]


@row("no weights at all", "no weights found in SRC: expected *.safetensors files")
def no_weights(case):
    (case.src / WEIGHTS).unlink()
    return [CONVERT, case.src, "-o", case.out]


@row("empty safetensors shard (0 bytes)",
     "empty or truncated safetensors file SRC/model.safetensors (0 bytes): re-download the checkpoint")
def empty_shard(case):
    (case.src / WEIGHTS).write_bytes(b"")
    return [CONVERT, case.src, "-o", case.out]


@row("safetensors shard cut short (half-downloaded)",
     "truncated safetensors file SRC/model.safetensors: N bytes on disk, N expected; re-download the checkpoint")
def truncated_shard(case):
    data = (case.src / WEIGHTS).read_bytes()
    (case.src / WEIGHTS).write_bytes(data[: len(data) // 2])
    return [CONVERT, case.src, "-o", case.out]


@row("safetensors shard cut inside its header",
     "truncated safetensors file SRC/model.safetensors (header runs past the end): re-download it")
def header_cut(case):
    data = (case.src / WEIGHTS).read_bytes()
    (case.src / WEIGHTS).write_bytes(data[:100])
    return [CONVERT, case.src, "-o", case.out]


@row("safetensors header that is not JSON",
     "corrupt safetensors header in SRC/model.safetensors: re-download the checkpoint")
def garbage_header(case):
    (case.src / WEIGHTS).write_bytes(b"\x10\0\0\0\0\0\0\0{not json!!!!!!!")
    return [CONVERT, case.src, "-o", case.out]


@row("index pointing at a missing shard",
     "missing safetensors shard SRC/model-00002-of-00002.safetensors: re-download the checkpoint")
def index_missing_shard(case):
    split_into_two_shards(case)
    (case.src / "model-00002-of-00002.safetensors").unlink()
    return [CONVERT, case.src, "-o", case.out]


@row("index naming a tensor its shard does not hold",
     "SRC/model.safetensors.index.json lists model.norm.weight in model-00001-of-00002.safetensors, which does not "
     "hold it: re-download")
def index_wrong_shard(case):
    weight_map = split_into_two_shards(case)
    weight_map["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (case.src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [CONVERT, case.src, "-o", case.out]


@row("index that is not JSON", "corrupt SRC/model.safetensors.index.json: it has no readable weight_map; re-download it")
def corrupt_index(case):
    split_into_two_shards(case)
    (case.src / "model.safetensors.index.json").write_text('{"weight_map": ')
    return [CONVERT, case.src, "-o", case.out]


@row("several shards but no index",
     "SRC has 2 safetensors files but no model.safetensors.index.json: re-download the checkpoint")
def shards_without_index(case):
    split_into_two_shards(case)
    (case.src / "model.safetensors.index.json").unlink()
    return [CONVERT, case.src, "-o", case.out]


@row("tensor shape disagreeing with config.json",
     "model.layers.0.self_attn.q_proj.weight has shape (N, N) but config.json implies (N, N): the weights and "
     "config.json do not belong together")
def shape_mismatch(case):
    rewrite_config(case, head_dim=4)
    return [CONVERT, case.src, "-o", case.out]


@row("NaN in an input weight",
     "tensor model.layers.0.mlp.up_proj.weight holds 1 NaN and 0 Inf values: the checkpoint is damaged (or saved after "
     "a diverged training step); re-download it or fix that tensor")
def nan_weight(case):
    damage_tensor(case, "model.layers.0.mlp.up_proj.weight", float("nan"))
    return [CONVERT, case.src, "-o", case.out]


@row("Inf in an input attention weight",
     "tensor model.layers.1.self_attn.k_proj.weight holds 0 NaN and 1 Inf values: the checkpoint is damaged (or saved "
     "after a diverged training step); re-download it or fix that tensor")
def inf_weight(case):
    damage_tensor(case, "model.layers.1.self_attn.k_proj.weight", float("-inf"))
    return [CONVERT, case.src, "-o", case.out]


@row("unsupported architecture (Bloom)",
     "unsupported architecture 'bloom': convert-diff-transformer supports falcon, gemma, gemma2, gemma3_text, gpt2, "
     "gpt_neox, gpt_oss, granite, llama, ministral, mistral, mixtral, olmo2, olmo3, phi3, qwen2, qwen3, qwen3_moe, "
     "smollm3, stablelm; convert a model of one of these families")
def unsupported_architecture(case):
    from transformers import BloomConfig, BloomForCausalLM

    case.src = case.tmp / "bloom"
    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50)).save_pretrained(case.src)
    return [CONVERT, case.src, "-o", case.out]


@row("refused architecture (DeepSeek-V3: multi-head latent attention)",
     "unsupported architecture 'deepseek_v3': its multi-head latent attention (MLA) keeps keys and values compressed "
     "(kv_a_proj_with_mqa → kv_b_proj) with one decoupled RoPE key shared by all heads, which netmorph's per-head "
     "q/k/v surgeries do not model; netmorph does not convert it")
def refused_architecture(case):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    case.src = case.tmp / "deepseek_v3"
    config = DeepseekV3Config(vocab_size=50, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2,
                              num_experts_per_tok=1, n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=None,
                              qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
    DeepseekV3ForCausalLM(config).save_pretrained(case.src)
    return [CONVERT, case.src, "-o", case.out]


@row("quantized safetensors checkpoint (GPT-OSS with MXFP4 experts)",
     "SRC is quantized (quantization_config quant_method 'mxfp4'): netmorph rewrites full-precision weights; dequantize "
     "it first (load it with transformers' dequantize option and save_pretrained) and run on that copy")
def quantized_checkpoint(case):
    import json

    from tests.family_models import save_family_model

    case.src = save_family_model(case.tmp / "gpt_oss", "gpt_oss")
    config = json.loads((case.src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}  # as the published gpt-oss checkpoints say
    (case.src / "config.json").write_text(json.dumps(config))
    return [CONVERT, case.src, "-o", case.out]


@row("Falcon with ALiBi position biases",
     "this falcon model uses ALiBi position biases (config alibi=true), which convert-diff-transformer does not carry "
     "into differential attention: convert a RoPE model of the family")
def alibi_falcon(case):
    from tests.family_models import save_family_model

    case.src = save_family_model(case.tmp / "falcon", "falcon-mha", alibi=True)
    return [CONVERT, case.src, "-o", case.out]


@row("`--split-heads` with odd head counts (9 query / 3 KV)",
     "--split-heads needs even head counts, but the model has 9 query and 3 KV heads: drop --split-heads to use the "
     "doubled-heads layout")
def split_heads_odd(case):
    return [CONVERT, case.src, "-o", case.out, "--split-heads"]


@row("`--export diffllama` of a sliding-window model (Mistral)",
     "--export diffllama cannot represent sliding-window attention (DiffLlama attends to the whole context): convert "
     "without --export to keep the window")
def export_diffllama_sliding(case):
    rewrite_config(case, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=7)
    return [CONVERT, case.src, "-o", case.out, "--export", "diffllama"]


@row("`--variant v2 --split-heads`",
     "--split-heads does not apply to --variant v2 (its negative heads are mirrored query heads and λ = "
     "sigmoid(lambda_proj(x))): drop it or drop --variant v2")
def variant_v2_split(case):
    return [CONVERT, case.src, "-o", case.out, "--variant", "v2", "--split-heads"]


@row("`--export diffllama --split-heads`",
     "--split-heads does not apply to --export diffllama (DiffLlama fixes its layout, norm and "
     "λ_init): drop it or drop --export diffllama")
def export_diffllama_split(case):
    return [CONVERT, case.src, "-o", case.out, "--export", "diffllama", "--split-heads"]


@row("`grow --num-attention-heads 10` on 9 query / 3 KV heads (impossible GQA grouping)",
     "10 query heads cannot be split into 3 KV heads: pick --num-key-value-heads from [5, 10] or heads a multiple of 3")
def grow_heads_impossible(case):
    return ["grow", case.src, "-o", case.out, "--num-attention-heads", "10"]


@row("`grow --hidden-size 30` on hidden 36 (shrinking)",
     "--hidden-size 30 is smaller than the model's 36: grow only (pass a value ≥ 36, or leave it out)")
def grow_hidden_smaller(case):
    return ["grow", case.src, "-o", case.out, "--hidden-size", "30"]


@row("`grow --hidden-size 40` on a Qwen3 (per-head q/k norms)",
     "qwen3 grows hidden_size by whole copies of the residual stream (its q/k norms share rms_norm_eps with every "
     "norm, so zero-fill's eps × n/n′ would not be exact): pass --hidden-size a multiple of 32 (e.g. 64)")
def grow_qwen3_hidden(case):
    from tests.grow_helpers import save_tiny

    case.src = save_tiny(case.tmp / "qwen3", "qwen3")
    return ["grow", case.src, "-o", case.out, "--hidden-size", "40"]


@row("`grow --num-key-value-heads 2` on a multi-query Falcon",
     "this falcon model is multi-query (one KV head, config multi_query): leave --num-key-value-heads out")
def grow_falcon_multi_query_kv(case):
    from tests.grow_helpers import save_tiny

    case.src = save_tiny(case.tmp / "falcon", "falcon")
    return ["grow", case.src, "-o", case.out, "--num-key-value-heads", "2"]


@row("`--zero-init` (netmorph ≤ 0.2)", "--zero-init was replaced by --negative-init zero")
def renamed_zero_init(case):
    return [CONVERT, case.src, "-o", case.out, "--zero-init"]


@row("`--split-heads --negative-init zero`",
     "--split-heads reuses existing heads as the negative component: drop --negative-init zero")
def split_and_zero(case):
    return [CONVERT, case.src, "-o", case.out, "--split-heads", "--negative-init", "zero"]


@row("`--max-shard-size lots`",
     "invalid option: max_shard_size: not a size: 'lots' (examples: 500MB, 5GB, 2GiB)")
def bad_shard_size(case):
    return [CONVERT, case.src, "-o", case.out, "--max-shard-size", "lots"]


@row("`--seed abc`",
     "Invalid value for '--seed': 'abc' is not a valid integer. (see `netmorph convert-diff-transformer --help`)")
def bad_seed(case):
    return [CONVERT, case.src, "-o", case.out, "--seed", "abc"]


@row("no `--output-dir` (and none in the YAML)", "no output directory: pass --output-dir DIR")
def no_output_dir(case):
    return [CONVERT, case.src]


@row("non-empty output dir without `--force` (left untouched)", "output dir OUT is not empty: pass --force to replace it")
def output_not_empty(case):
    case.out.mkdir()
    (case.out / "keep.txt").write_text("precious")
    return [CONVERT, case.src, "-o", case.out]


@row("output path that is a file (left untouched)", "output path OUT is a file: choose a directory path")
def output_is_file(case):
    case.out.write_text("precious")
    return [CONVERT, case.src, "-o", case.out]


@row("output inside the input dir", "output dir OUT is inside the input SRC: choose a path outside it")
def output_inside_input(case):
    case.out = case.src / "converted"
    return [CONVERT, case.src, "-o", case.out]


@row("read-only output location (chmod 0o555; as root: CAP_DAC_OVERRIDE dropped)",
     "cannot write the output in PARENT: permission denied; choose a writable --output-dir", subprocess=True)
def read_only_location(case):
    case.out = case.tmp / "read-only" / "out"
    case.parent.mkdir()
    case.parent.chmod(0o555)
    return [CONVERT, case.src, "-o", case.out, "--no-verify"]


@row("full output location (writes fail with EFBIG: `ulimit -f`)",
     "cannot write the output in PARENT: the file size limit was reached (disk full or `ulimit -f`); free space there "
     "or choose another --output-dir", subprocess=True)
def full_location(case):
    return [CONVERT, case.src, "-o", case.out, "--no-verify"]


@row("GGUF with a quantized type gguf cannot dequantize (Q8_1)",
     "GGUF tensor blk.0.attn_q.weight in SRC has type Q8_1, which the installed gguf package cannot dequantize: use a "
     "file quantized as F32, F16, BF16, Q8_0 or a K-quant (Q4_K, Q6_K, ...)")
def gguf_q8_1(case):
    from gguf import GGMLQuantizationType

    (case.tmp / "gguf").mkdir()
    case.src = write_tiny_gguf(case.tmp / "gguf" / "tiny.gguf", GGMLQuantizationType.Q8_1)
    return [CONVERT, case.src, "-o", case.out]


@row("YAML with an unknown `diff_attn_*` key",
     "PARENT/train.yml: unknown key 'diff_attn_warmup_step'; known diff_attn keys: diff_attn_warmup_steps, "
     "diff_attn_log_every, diff_attn_num_monitor_layers")
def yaml_unknown_diff_key(case):
    return [CONVERT, write_yaml(case, "base_model: SRC\ndiff_attn_warmup_step: 10\n"), "-o", case.out]


@row("YAML with a misspelt netmorph key", "PARENT/train.yml: unknown key 'base_modle': did you mean 'base_model'?")
def yaml_misspelt_key(case):
    return [CONVERT, write_yaml(case, "base_model: SRC\nbase_modle: SRC\n"), "-o", case.out]


@row("YAML value of the wrong type",
     "PARENT/train.yml: diff_attn_warmup_steps: Input should be a valid integer, unable to parse string as an integer")
def yaml_wrong_type(case):
    return [CONVERT, write_yaml(case, "base_model: SRC\ndiff_attn_warmup_steps: lots\n"), "-o", case.out]


@row("YAML without `base_model`", "PARENT/train.yml: base_model: Field required")
def yaml_no_base_model(case):
    return [CONVERT, write_yaml(case, "learning_rate: 0.001\n"), "-o", case.out]


@row("YAML that is a list, not a mapping", "PARENT/train.yml must hold a YAML mapping with at least a base_model key")
def yaml_not_mapping(case):
    return [CONVERT, write_yaml(case, "- base_model: SRC\n"), "-o", case.out]


@row("YAML syntax error", "PARENT/train.yml is not valid YAML: while parsing a flow sequence")
def yaml_syntax(case):
    return [CONVERT, write_yaml(case, "base_model: [SRC\n"), "-o", case.out]


@row("`.bin`-only (pickle) checkpoint without `--allow-pickle`",
     "SRC holds only pickle weights (pytorch_model.bin); netmorph never loads pickle by default: convert them to "
     "safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)")
def pickle_refused(case):
    state = load_file(case.src / WEIGHTS)
    (case.src / WEIGHTS).unlink()
    torch.save(state, case.src / "pytorch_model.bin")
    return [CONVERT, case.src, "-o", case.out]


@row("`.bin` that runs code when unpickled, even with `--allow-pickle`",
     "refusing SRC/pytorch_model.bin: it holds more than plain tensors, so loading it could run code "
     "(torch.load(weights_only=True) refused it); convert it to safetensors with a tool you trust")
def pickle_with_code(case):
    (case.src / WEIGHTS).unlink()
    with (case.src / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"model.norm.weight": RunsCode(case.tmp / "code-ran")}, f)
    return [CONVERT, case.src, "-o", case.out, "--allow-pickle"]


@row("checkpoint that needs its own model code (`auto_map`)",
     "SRC needs its own model code (model_type 'my_custom_llama', auto_map in config.json); netmorph does not run code "
     "from a checkpoint unless you pass --trust-remote-code")
def remote_code(case):
    rewrite_config(case, model_type="my_custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    return [CONVERT, case.src, "-o", case.out]


@row("`verify` on a converted dir whose shard is truncated",
     "truncated safetensors file OUT/model.safetensors: N bytes on disk, N expected; re-download the checkpoint")
def verify_truncated(case):
    from tests.helpers import convert

    convert(case.src, case.out)
    data = (case.out / WEIGHTS).read_bytes()
    (case.out / WEIGHTS).write_bytes(data[: len(data) - 1000])
    return ["verify", case.src, case.out]


@row("`verify --layerwise` on a model grown in hidden size",
     "SRC has hidden size 36 and OUT 72: layer-wise verification feeds one model's hidden states to the other's "
     "layers, so it needs equal widths; verify the whole models instead (drop --layerwise)")
def verify_layerwise_wider(case):
    from tests.helpers import save_char_tokenizer

    save_char_tokenizer(case.src)
    runner = CliRunner()
    result = runner.invoke(main, ["grow", str(case.src), "-o", str(case.out), "--hidden-size", "72", "--no-verify"])
    assert result.exit_code == 0, result.output
    return ["verify", case.src, case.out, "--layerwise"]


@row("`verify` on a `.bin`-only original without `--allow-pickle`",
     "SRC holds only pickle weights (pytorch_model.bin); netmorph never loads pickle by default: convert them to "
     "safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)")
def verify_pickle(case):
    state = load_file(case.src / WEIGHTS)
    (case.src / WEIGHTS).unlink()
    torch.save(state, case.src / "pytorch_model.bin")
    case.out = case.tmp / "also-src"
    save_tiny_model(case.out, "llama")
    return ["verify", case.src, case.out]


@row("`verify --allow-pickle` on a `.bin` that runs code when unpickled",
     "refusing SRC: its pickle weights hold more than plain tensors, so loading them could run code "
     "(torch.load(weights_only=True) refused them); convert them to safetensors with a tool you trust")
def verify_pickle_with_code(case):
    (case.src / WEIGHTS).unlink()
    with (case.src / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"model.norm.weight": RunsCode(case.tmp / "code-ran")}, f)
    case.out = case.tmp / "also-src"
    save_tiny_model(case.out, "llama")
    return ["verify", case.src, case.out, "--allow-pickle"]


@row("`qkv-layout` without `--to`",
     "no target layout: pass --to with one of separate, sequential, interleaved, grouped")
def qkv_no_target(case):
    return ["qkv-layout", case.src, "-o", case.out]


@row("`qkv-layout --to interleaved` on 9 query / 3 KV heads",
     "the interleaved layout needs as many key/value heads as query heads, but this model has 9 query and 3 "
     "key/value heads (GQA): use --to grouped, which stores the same per-group order for shared key/value heads")
def qkv_interleaved_gqa(case):
    return ["qkv-layout", case.src, "-o", case.out, "--to", "interleaved"]


@row("`qkv-layout --to grouped` on Llama without `--allow-non-stock`",
     "no stock transformers class reads a llama model in the grouped layout: pass --allow-non-stock to write it "
     "anyway (config.json records netmorph_qkv_layout; `--to separate` converts it back)")
def qkv_non_stock(case):
    return ["qkv-layout", case.src, "-o", case.out, "--to", "grouped"]


@row("`qkv-layout --to sequential` on a Llama that Phi-3 cannot hold (biases, head_dim ≠ hidden / heads)",
     "no stock transformers class reads a llama model in the sequential layout (the stock phi3 class cannot hold it: "
     "head_dim 8 × 9 heads ≠ hidden_size 36; it has biases): pass --allow-non-stock to write it anyway (config.json "
     "records netmorph_qkv_layout; `--to separate` converts it back)")
def qkv_not_phi3(case):
    return ["qkv-layout", case.src, "-o", case.out, "--to", "sequential"]


@row("`verify` on a checkpoint `qkv-layout` wrote in a layout no stock class reads",
     "OUT holds its q/k/v weights in the grouped layout (netmorph_qkv_layout in config.json), which no stock llama "
     "class reads: convert it back first with `netmorph qkv-layout OUT --to separate -o DIR`")
def verify_non_stock_layout(case):
    from netmorph.options import QkvLayoutOptions
    from netmorph.surgery.qkv_layout import convert_qkv_layout

    convert_qkv_layout(str(case.src), case.out, QkvLayoutOptions.build(to="grouped", allow_non_stock=True,
                                                                       verify=False))
    return ["verify", case.src, case.out]


@row("converting a netmorph differential checkpoint again",
     "this is already a netmorph differential-attention checkpoint (model_type 'netmorph_diff_llama'), which "
     "convert-diff-transformer does not take as a source: run it on the original model instead")
def convert_a_conversion(case):
    from netmorph.surgery.diff import convert_diff_transformer
    from netmorph.options import ConvertOptions

    converted = case.tmp / "converted"
    convert_diff_transformer(str(case.src), converted, ConvertOptions.build(verify=False))
    case.src = converted
    return [CONVERT, converted, "-o", case.out]


@row("config.json a transformers config class rejects (Qwen3 with `head_dim: null`)",
     "transformers cannot read SRC/config.json: Validation error for field 'head_dim': TypeError: Field 'head_dim' "
     "expected int, got NoneType (value: None); fix that field of config.json")
def rejected_config(case):
    from tests.family_models import save_family_model

    save_family_model(case.src, "qwen3")
    rewrite_config(case, head_dim=None)
    return [CONVERT, case.src, "-o", case.out]


@row("config.json that says untied embeddings for a checkpoint without lm_head",
     "SRC has no lm_head.weight, which its config.json needs: the checkpoint is incomplete, or config.json does not "
     "belong to it (e.g. tie_word_embeddings)")
def untied_without_head(case):
    rewrite_config(case, tie_word_embeddings=False)
    return [CONVERT, case.src, "-o", case.out]


@row("`train` with sequence_len beyond the model's context",
     "PARENT/train.yml: sequence_len 4096 is longer than the model's context (128 tokens, max_position_embeddings): "
     "set sequence_len to at most 128")
def train_beyond_context(case):
    (case.tmp / "data.txt").write_text("some text " * 50)
    return ["train", write_yaml(case, f"base_model: SRC\noutput_dir: {case.out}\nsequence_len: 4096\n"
                                      f"datasets: [{{path: {case.tmp / 'data.txt'}, type: completion}}]\n")]


@row("`train` with `fp16: true` on a machine without CUDA",
     "PARENT/train.yml: fp16: true needs a CUDA GPU (fp16 mixed precision), and this machine has none: use bf16: "
     "true (bf16 autocast runs on the CPU) or drop fp16")
def train_fp16_on_cpu(case):
    if torch.cuda.is_available():
        pytest.skip("the row is about a machine without CUDA")
    (case.tmp / "data.txt").write_text("some text " * 50)
    return ["train", write_yaml(case, f"base_model: SRC\noutput_dir: {case.out}\nsequence_len: 32\nfp16: true\n"
                                      f"datasets: [{{path: {case.tmp / 'data.txt'}, type: completion}}]\n")]


@row("`train` with two precisions (`bfloat16: true`, `float32: true`)",
     "PARENT/train.yml: bfloat16 and float32 conflict: choose one precision")
def train_two_precisions(case):
    (case.tmp / "data.txt").write_text("some text " * 50)
    return ["train", write_yaml(case, f"base_model: SRC\noutput_dir: {case.out}\nbfloat16: true\nfloat32: true\n"
                                      f"datasets: [{{path: {case.tmp / 'data.txt'}, type: completion}}]\n")]


# --- running a row ---------------------------------------------------------------------------------------------

def expected_pattern(message: str, case: Case) -> str:
    """The README message as a regex: SRC / OUT / PARENT are this row's paths, N is any number."""
    pattern = re.escape(message)
    for placeholder, value in (("PARENT", case.parent), ("SRC", case.src), ("OUT", case.out)):
        pattern = pattern.replace(placeholder, re.escape(str(value)))
    return re.sub(r"\bN\b", r"\\d+", pattern)


def _drop_dac_override():
    """Run as root, chmod does not bind; without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH in the bounding set the
    child is held to the permission bits like any user (PR_CAPBSET_DROP = 24)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _limit_file_size():
    """Every write past 4 KiB fails with EFBIG, as on a full disk (SIGXFSZ ignored so it is an error, not a kill)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def run_in_subprocess(args, preexec) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    code = "import sys; sys.argv[0] = 'netmorph'; from netmorph.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=False, env=env, preexec_fn=preexec,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("table_row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_row(table_row, tmp_path):
    case = Case(tmp_path, save_tiny_model(tmp_path / "src", "llama"), tmp_path / "out")
    args = table_row.build(case)
    before = {p: p.read_bytes() for p in case.out.rglob("*") if p.is_file()} if case.out.exists() else None
    if table_row.subprocess:
        preexec = _limit_file_size if table_row.name == "full_location" else _drop_dac_override
        if preexec is _drop_dac_override and os.geteuid() != 0:
            preexec = None
        exit_code, output = run_in_subprocess(args, preexec)
    else:
        result = CliRunner().invoke(main, [str(a) for a in args], prog_name="netmorph", catch_exceptions=False)
        exit_code, output = result.exit_code, result.output
    try:
        assert exit_code == 2, output
        assert "Traceback" not in output, output
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and output.rstrip().splitlines()[-1] == errors[0], output
        assert re.fullmatch(expected_pattern(table_row.message, case), errors[0].removeprefix("error: ")), errors[0]
        if before is not None:  # the user's own dir or file (or the dir under `verify`) stays exactly as it was
            assert {p: p.read_bytes() for p in case.out.rglob("*") if p.is_file()} == before
        elif case.out.is_file():
            assert case.out.read_text() == "precious"
        else:
            assert not case.out.exists()
        if case.parent.exists():
            leftovers = [p.name for p in case.parent.iterdir() if p.name.startswith(f".{case.out.name}.")]
            assert not leftovers, leftovers
        assert not (tmp_path / "code-ran").exists()
    finally:
        if case.parent.exists():
            case.parent.chmod(0o755)


def test_readme_table_is_this_table():
    """The README's bad-input table lists exactly these rows, with these messages, in this order."""
    text = README.read_text()
    table = text[text.index("| bad input | error (exact) |"):]
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), table.splitlines()[2:]))
    rows = [tuple(cell.strip() for cell in line.strip("|").split(" | ")) for line in lines]
    assert rows == [(r.bad_input, readme_cell(r.message)) for r in ROWS]
    assert len(rows) >= 20


def readme_cell(message: str) -> str:
    """How the README shows a message: a code span (double backticks when the message holds one)."""
    return f"`` error: {message} ``" if "`" in message else f"`error: {message}`"


def test_allowed_pickle_is_loaded_with_weights_only_and_converts_exactly(tmp_path):
    """The other half of the pickle rows: with --allow-pickle a plain tensor pickle converts, and exactly."""
    source = save_tiny_model(tmp_path / "src", "llama")
    reference = tmp_path / "reference"
    save_tiny_model(reference, "llama")
    state = load_file(source / WEIGHTS)
    (source / WEIGHTS).unlink()
    torch.save(state, source / "pytorch_model.bin")
    result = CliRunner().invoke(main, [CONVERT, str(source), "-o", str(tmp_path / "out"), "--allow-pickle",
                                       "--no-verify"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert max_logit_diff(load(reference), load(tmp_path / "out"), random_ids()) <= 1e-5


def test_plain_gguf_of_the_same_shape_converts(tmp_path):
    """Control for the Q8_1 row: the same tiny GGUF with F32 tensors converts, so the row fails for the type alone."""
    (tmp_path / "gguf").mkdir()
    source = write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    result = CliRunner().invoke(main, [CONVERT, str(source), "-o", str(tmp_path / "out"), "--no-verify"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / WEIGHTS).exists()
