"""The mutation scores of `make mutation` (mutmut 3, configured in pyproject.toml), per file and per function, written
into BENCHMARKS.md ("## Mutation testing" is replaced on each run).

Score = caught / checked: caught = killed + timeout (a mutant that makes a test hang is detected), checked = every
mutant mutmut ran or found no test for (a mutant no selected test runs counts against the score). Mutants not
checked yet (an interrupted run) are listed in their own column and left out of the score.
Run after `mutmut run`, from the repository root:  python benchmarks/mutation_score.py
"""

import collections
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402

GOALS = {"netmorph/ops": 0.90, "netmorph/modeling": 0.80}  # issue "Tests that can fail"


def results() -> list[tuple[str, str, str]]:
    """(file, function, status) of every mutant mutmut ran."""
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                             text=True, check=True).stdout
    rows = []
    for line in listing.splitlines():
        match = re.match(r"\s*(netmorph\.[\w.]+)\.x[ǁ_]?(.+?)__mutmut_\d+: (.+)", line)
        if match:
            module, function, status = match.groups()
            rows.append((module.replace(".", "/") + ".py", function.replace("ǁ", "."), status.strip()))
    return rows


def main() -> None:
    rows = results()
    if not rows:
        sys.exit("no mutmut results: run `mutmut run` first (make mutation)")
    by_file = collections.defaultdict(collections.Counter)
    survivors = collections.defaultdict(collections.Counter)
    for file, function, status in rows:
        by_file[file][status] += 1
        if status in ("survived", "no tests"):
            survivors[file][f"{function} ({status})"] += 1
    lines = [f"\n## Mutation testing (`make mutation`, {datetime.date.today()})\n",
             f"mutmut 3.8.1 on {platform.processor() or platform.machine()}, 2 workers; score = (killed + timeout) / "
             "checked (a mutant no selected test runs counts as surviving; mutants not checked are left out). "
             "Goals: ops ≥ 90 %, modeling ≥ 80 %.\n",
             "| file | mutants | not checked | killed | timeout | survived | no tests | score |",
             "|---|---|---|---|---|---|---|---|"]
    for area in GOALS:
        total = collections.Counter()
        for file, counts in sorted(by_file.items()):
            if file.startswith(area):
                total.update(counts)
                lines.append(_row(file, counts))
        lines.append(_row(f"**{area}/ total**", total))
    lines += ["", "Surviving mutants by function (count):", ""]
    for file, counts in sorted(survivors.items()):
        lines.append(f"- `{file}`: " + ", ".join(f"{name} × {n}" for name, n in counts.most_common()))
    path = write_section("\n".join(lines) + "\n", replace="## Mutation testing")
    print("\n".join(lines))
    print(f"wrote {path}")


def _row(name: str, counts: collections.Counter) -> str:
    total = sum(counts.values())
    checked = total - counts["not checked"]
    caught = counts["killed"] + counts["timeout"]
    score = f"{caught / checked:.1%}" if checked else "–"
    return (f"| {name} | {total} | {counts['not checked']} | {counts['killed']} | {counts['timeout']} | "
            f"{counts['survived']} | {counts['no tests']} | {score} |")


if __name__ == "__main__":
    main()
