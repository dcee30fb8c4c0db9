"""lm-evaluation-harness runs converted and grown checkpoints with its `hf` model type and `trust_remote_code=True`,
on a local task (YAML + jsonl, no hub downloads): its accuracy and per-choice log-likelihoods equal the original
model's for exact surgeries, and a hand computation of the choice log-likelihoods through the model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from netmorph.options import GrowOptions
from netmorph.surgery.grow import grow
from tests.helpers import convert, load, save_char_tokenizer, save_tiny_model

lm_eval = pytest.importorskip("lm_eval")  # the `test` extra installs it: a skip here means a broken environment

QUESTIONS = [
    ("The license grants you the right to", [" copy", " eat", " fly"], 0),
    ("Free software means", [" freedom", " price", " a cat"], 0),
    ("Copyright (C) 2007 Free Software", [" Foundation", " Lunch", " Mountain"], 0),
    ("You may convey verbatim", [" copies", " bananas", " thunder"], 0),
    ("This program is distributed in the hope that it will be", [" useful", " purple", " loud"], 0),
    ("WITHOUT ANY", [" WARRANTY", " MERCY", " SOUND"], 0),
    ("The quick brown fox jumps over the lazy", [" cat", " dog"], 1),
    ("Licensed under the Apache", [" fish", " License"], 1),
]


def write_task(directory):
    """A multiple-choice task in lm-eval's YAML format over a local jsonl file (the `json` dataset builder that ships
    with `datasets`: nothing is downloaded)."""
    data = directory / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (directory / "tiny_mc.yaml").write_text(f"""task: netmorph_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return directory


def evaluate(model_dir, task_dir):
    """lm_eval's accuracy and the per-document, per-choice log-likelihoods (lm_eval's own numbers)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},trust_remote_code=True,dtype=float32", tasks=["netmorph_tiny_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), device="cpu", batch_size=4, log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(results["samples"]["netmorph_tiny_mc"], key=lambda s: s["doc_id"])
    return results["results"]["netmorph_tiny_mc"]["acc,none"], [[r[0] for r in s["filtered_resps"]] for s in samples]


@torch.no_grad()
def hand_loglikelihoods(model_dir, tokenizer_dir):
    """log p(choice | question) = Σ log softmax of the continuation's tokens, written out with one forward per pair."""
    from transformers import AutoTokenizer

    model, tokenizer = load(model_dir), AutoTokenizer.from_pretrained(str(tokenizer_dir))
    table = []
    for question, choices, _ in QUESTIONS:
        context = tokenizer(question, add_special_tokens=False).input_ids
        row = []
        for choice in choices:
            continuation = tokenizer(choice, add_special_tokens=False).input_ids
            ids = torch.tensor([context + continuation])
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, len(context):]
            row.append(logprobs[len(context) - 1:].gather(-1, targets[:, None]).sum().item())
        table.append(row)
    return table


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    source = save_tiny_model(root / "original", "llama")
    save_char_tokenizer(source)
    models = {"original": source}
    models["v1"] = convert(source, root / "v1").output_dir
    models["v2"] = convert(source, root / "v2", variant="v2").output_dir
    models["grown"] = grow(str(source), root / "grown", GrowOptions.build(num_layers=3, verify=False)).output_dir
    return root, models


def test_lm_eval_scores_converted_and_grown_like_the_original(checkpoints):
    root, models = checkpoints
    task_dir = write_task(root)
    hand = hand_loglikelihoods(models["original"], models["original"])
    expected_acc = sum(max(range(len(row)), key=row.__getitem__) == answer
                       for row, (_, _, answer) in zip(hand, QUESTIONS)) / len(QUESTIONS)
    for name, directory in models.items():
        acc, loglikelihoods = evaluate(directory, task_dir)
        assert acc == expected_acc, name
        for got, want in zip(loglikelihoods, hand):
            assert got == pytest.approx(want, abs=1e-4), name


def test_lm_eval_cli_runs_a_converted_checkpoint_without_netmorph(checkpoints, tmp_path):
    """The command the README shows, in a fresh process in which `import netmorph` fails: the checkpoint's own
    modeling code (auto_map, trust_remote_code) is what runs."""
    root, models = checkpoints
    task_dir = write_task(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "netmorph.py").write_text("raise ImportError('netmorph is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={models['v1']},trust_remote_code=True,dtype=float32", "--tasks", str(task_dir / "tiny_mc.yaml"),
         "--device", "cpu", "--batch_size", "4", "--output_path", str(out)],
        check=True, env=env, cwd=tmp_path, capture_output=True, text=True,
    )
    (result_file,) = out.rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"]["netmorph_tiny_mc"]["acc,none"]
    assert acc == evaluate(models["original"], write_task(tmp_path))[0]
