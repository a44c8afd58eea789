"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_run(tmp_path, monkeypatch):
    """Every python block runs, in a scratch directory (the examples save checkpoints)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README has lost its python examples"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = [line.split("#")[0].strip() for line in README.read_text().splitlines()
                if line.startswith("python -m pytest")]
    assert len(commands) == 1, "the README must name exactly one test command"
    assert "README.md" in ci and "python -m pytest" in ci


def test_results_tables_match_the_committed_results():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "readme_tables.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "<!-- results:begin -->\n**Seeds' algorithms" in (root / "README.md").read_text()
