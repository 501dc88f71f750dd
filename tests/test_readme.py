"""The README stays documentation that works: its commands parse, every shipped config is in its
table, every config it names exists, and it stays short (measurements go to docs/results.md)."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_first_block_holds_the_two_commands_ci_runs():
    first = fenced_blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].startswith("bash install.sh && ") and "configs/quickstart.yaml" in first[0]
    assert first[1].startswith("bash install.sh --dev && ") and "pytest" in first[1]


def test_every_shell_block_parses():
    for block in fenced_blocks("bash"):
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert result.returncode == 0, (block, result.stderr)


def test_every_shipped_config_is_in_the_table_and_every_named_config_exists():
    rows = [line for line in README.splitlines() if line.startswith("| `configs/")]
    in_table = {re.match(r"\| `(configs/[^`]+)`", row).group(1) for row in rows}
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "data"}
    assert in_table == shipped
    for docs in [README, *(p.read_text() for p in (REPO / "docs").glob("*.md"))]:
        for named in set(re.findall(r"configs/[\w/]+\.yaml", docs)):
            assert (REPO / named).is_file(), named


def test_the_readme_is_documentation_not_a_notebook():
    assert len(README.splitlines()) <= 350
    for path in re.findall(r"`(docs/[\w.]+\.md)`", README):
        assert (REPO / path).is_file(), path
