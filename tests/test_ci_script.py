"""`.ci/run` runs exactly the one test command the README gives, so a reader can repeat CI by hand."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    skip = ("#", "set ", "cd ")
    return [line for line in lines if line.strip() and not line.startswith(skip)]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = _readme_test_commands()
    assert len(readme) == 1, "the README's test section must give one command"
    assert _ci_commands() == readme
    assert "pytest -q" in readme[0] and "pip install torch==2.13.0" in readme[0]
