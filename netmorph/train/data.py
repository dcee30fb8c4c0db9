"""Training and evaluation data from local files: plain text, JSON lines or parquet, packed into fixed-length blocks.

Every document is tokenized, followed by the EOS token, concatenated, and cut into blocks of `sequence_len`
tokens (the last partial block is dropped unless it is the only one). Packing keeps every token useful and needs no
padding, so the loss of two models on the same blocks is directly comparable.
"""

import json
from pathlib import Path

import torch

from netmorph.errors import NetmorphError

TEXT_SUFFIXES = (".txt", ".md", "")
JSON_SUFFIXES = (".jsonl", ".json")


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """The documents of one local file: a .txt file is one document; JSONL/parquet rows give `field`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NetmorphError(f"dataset {path} does not exist: datasets must be local .txt, .jsonl or .parquet files")
    if path.suffix == ".parquet":
        return _parquet_documents(path, field)
    if path.suffix in JSON_SUFFIXES:
        return _json_documents(path, field)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise NetmorphError(f"dataset {path} is not UTF-8 text: use .txt, .jsonl or .parquet") from None


def _json_documents(path: Path, field: str) -> list[str]:
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NetmorphError(f"{path}:{number}: not a JSON object ({e.msg}); JSONL needs one object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise NetmorphError(f"{path}:{number}: no string field {field!r}; set `field:` in the dataset entry")
        documents.append(row[field])
    return documents


def _parquet_documents(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NetmorphError(f"reading {path} needs pyarrow: pip install 'netmorph[train]'") from None

    table = pq.read_table(path)
    if field not in table.column_names:
        raise NetmorphError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)}); set `field:`")
    return [str(value) for value in table.column(field).to_pylist() if value is not None]


def pack(tokenizer, documents: list[str], sequence_len: int) -> torch.Tensor:
    """(N, sequence_len) token blocks from the documents, each followed by EOS."""
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise NetmorphError("the dataset holds fewer than 2 tokens: nothing to train or evaluate on")
    blocks = max(1, len(ids) // sequence_len)
    usable = ids[: blocks * sequence_len] if len(ids) >= sequence_len else ids
    return torch.tensor(usable).view(blocks, -1)


class BlockDataset(torch.utils.data.Dataset):
    """Causal-LM examples from packed blocks; labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone(), "attention_mask": torch.ones_like(block)}
