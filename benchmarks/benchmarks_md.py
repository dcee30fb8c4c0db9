"""Writing a benchmark's section into BENCHMARKS.md (shared by the scripts in this folder)."""

from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery figure with its date, machine, versions and the command that produced it.\n"


def write_section(section: str, replace: str | None = None) -> Path:
    """Append `section` (starting "\\n## …") to BENCHMARKS.md; with `replace`, the heading prefix of an earlier
    section ("## Streaming conversion of"), that section is replaced instead (appended when there is none)."""
    text = PATH.read_text() if PATH.exists() else HEADER
    start = text.find(f"\n{replace}") if replace else -1
    if start < 0:
        text += section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    PATH.write_text(text)
    return PATH
