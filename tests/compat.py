"""The compatibility job: the `compat` tests against the oldest transformers netmorph declares and the newest release on
the registry, each in its own environment. `make test` runs it after the main suite (which runs on the locked
versions of constraints.txt); `make compat` runs it alone.

    python -m tests.compat [--versions 5.16.1 5.24.0]

Checkpoints carry netmorph's modeling code to the user's transformers, so a release we never tested must not turn a
converted model into garbage. For each version the job
1. installs transformers==VERSION (and whichever of its dependencies the locked environment cannot serve, e.g. an
   older huggingface_hub) with `pip install --target .venv/compat/transformers-VERSION`, everything else pinned by
   constraints.txt; the tests then import it first through PYTHONPATH (tests/conftest.py checks the version);
2. writes the checkpoints of tests/compat_checkpoints.py under that version;
3. runs `pytest -m "compat and not real_model"` under that version, with the checkpoints the OTHER version wrote
   (tests/test_compat_checkpoints.py: they must generate exactly what the original model generates here).
Exit status 0 when every version passed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = ROOT / ".venv" / "compat"
# Left out of the constraints of a compat environment: transformers itself and the hub client stack, whose version
# each transformers release pins on its own (transformers < 5.19 needs huggingface_hub < 2, which uses httpx).
UNPINNED = re.compile(r"^(transformers|huggingface[-_]hub|hf[-_]xet|httpx\d*|httpcore\d*)==", re.IGNORECASE)


def declared_range() -> SpecifierSet:
    """The transformers requirement of pyproject.toml, e.g. `>=5.16.1,<6`."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [requirement] = [d for d in dependencies if re.match(r"transformers\b", d)]
    return SpecifierSet(requirement.removeprefix("transformers"))


def floor(spec: SpecifierSet) -> str:
    [lower] = [s.version for s in spec if s.operator == ">="]
    return lower


def newest(spec: SpecifierSet) -> str:
    """The newest final release of transformers on the registry that `spec` accepts (`pip index versions`)."""
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True,
                             text=True, timeout=120)
    match = re.search(r"Available versions: (.*)", listing.stdout)
    if listing.returncode or not match:
        sys.exit(f"compat: cannot list transformers releases on the registry: {listing.stderr.strip()[-500:]}")
    releases = [Version(v.strip()) for v in match.group(1).split(",")]
    return str(max(v for v in releases if not v.is_prerelease and spec.contains(v)))


def environment(version: str) -> Path:
    """.venv/compat/transformers-VERSION, installed once (a marker file says it is complete)."""
    target = ENVIRONMENTS / f"transformers-{version}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    constraints = ENVIRONMENTS / "constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    constraints.write_text("\n".join(line for line in lines if not UNPINNED.match(line)) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "--target", str(target), "-c", str(constraints), f"transformers=={version}"],
                             capture_output=True, text=True)
    if install.returncode:
        sys.exit(f"compat: cannot install transformers {version}: {install.stderr.strip()[-2000:]}")
    (target / ".complete").touch()
    return target


def run(version: str, target: Path, args: list[str], **extra_env) -> int:
    env = {**os.environ, "PYTHONPATH": str(target), "NETMORPH_COMPAT_TRANSFORMERS": version, **extra_env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", help="transformers versions (default: the declared floor and the "
                                                      "newest release on the registry)")
    args = parser.parse_args()
    spec = declared_range()
    versions = args.versions or list(dict.fromkeys([floor(spec), newest(spec)]))
    print(f"compat: transformers {' and '.join(versions)} (declared {spec})", flush=True)
    targets = {version: environment(version) for version in versions}
    checkpoints = {version: ENVIRONMENTS / "checkpoints" / version for version in versions}
    for version, target in targets.items():
        shutil.rmtree(checkpoints[version], ignore_errors=True)
        if run(version, target, ["-m", "tests.compat_checkpoints", str(checkpoints[version])]):
            sys.exit(f"compat: writing the checkpoints under transformers {version} failed")
    outcome = {}
    for index, (version, target) in enumerate(targets.items()):
        foreign = checkpoints[versions[index - 1]]  # the other version's (itself when only one version is run)
        start = time.monotonic()
        status = run(version, target, ["-m", "pytest", "-n", "2", "--timeout", "900", "-q", "-p", "no:cacheprovider",
                                       "-m", "compat and not real_model", "--disable-warnings"], NETMORPH_COMPAT_FOREIGN=str(foreign))
        outcome[version] = f"{'PASS' if status == 0 else f'FAIL (pytest exit {status})'} in {time.monotonic() - start:.0f} s"
    print("compat: " + "; ".join(f"transformers {v}: {o}" for v, o in outcome.items()), flush=True)
    sys.exit(0 if all(o.startswith("PASS") for o in outcome.values()) else 1)


if __name__ == "__main__":
    main()
