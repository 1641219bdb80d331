"""The README's two opening commands are the ones CI and users run."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
  text = (REPO / "README.md").read_text()
  block = text.split("```bash\n", 1)[1].split("```", 1)[0]
  return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
  text = (REPO / "README.md").read_text()
  first_block = text.index("```bash")
  assert text[:first_block].strip().startswith("# kaojax")
  assert len(text[:first_block].strip().splitlines()) == 1  # nothing before them
  commands = _readme_commands()
  assert len(commands) == 2
  assert "run.py --config=configs/" in commands[0]
  assert commands[1].endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert _readme_commands()[1] in ci
