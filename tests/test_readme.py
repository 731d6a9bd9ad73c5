import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_commands():
    text = (REPO / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith("pip install") and "reidbench run --all" in commands[0]
    assert commands[1].startswith("pip install") and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci


def test_top_level_layout():
    for name in ("pyproject.toml", "reidbench", "attacks", "defenses", "model_zoo.yaml", "leaderboard", "tests", "CONTRIBUTING.md"):
        assert (REPO / name).exists(), name
    assert re.search(r'reidbench = "reidbench\.cli:main"', (REPO / "pyproject.toml").read_text())
