"""The README's configuration reference is the shipped default config, verbatim."""

from __future__ import annotations

from pathlib import Path

from evertune.config import default_config_text

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_matches_the_shipped_defaults() -> None:
    text = README.read_text()
    section = text.split("## Configuration reference", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == default_config_text()


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    blocks = [b.split("```", 1)[0].strip() for b in text.split("```bash\n")[1:3]]
    assert blocks == [
        "bash scripts/install && bash examples/quickstart.sh",
        "bash scripts/install && .venv/bin/python -m pytest",
    ]
    assert (
        "bash scripts/install && .venv/bin/python -m pytest"
        in (README.parent / ".ci" / "run").read_text()
    )
