"""The README's example commands, run as written: every ```bash block line that launches a script
under examples/ (torchrun or python), and the API example's ```python block itself, saved to a file
and launched with torchrun over 2 gloo processes. Each must exit 0 within its time limit. All start
at the module's first test, two at a time (concurrent_runs): a launch spends much of its time
starting processes and meeting its peers, which leaves cores idle."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import concurrent_runs

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def readme_example_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            if re.match(r"(torchrun|python)\b.*\bexamples/\S+\.py", line.strip()):
                commands.append(line.strip())
    return commands


COMMANDS = readme_example_commands()


def run(command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # The README assumes moe_dist installed (pip install -e .); PYTHONPATH stands in for it here.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # `python`/`torchrun` of this interpreter's environment, whatever PATH holds.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_the_readme_shows_every_example():
    shown = {re.search(r"examples/(\S+\.py)", c).group(1) for c in COMMANDS}
    scripts = {p.name for p in (ROOT / "examples").glob("*.py") if p.name != "toy_data.py"}
    assert shown == scripts, f"examples without a README command: {scripts - shown}"


@pytest.fixture(scope="module")
def example_runs():
    """command -> future of its process (README order; the longest ones are early)."""
    with concurrent_runs({c: (lambda c=c: run(c)) for c in COMMANDS}) as runs:
        yield runs


@pytest.mark.parametrize("command", COMMANDS, ids=[c.split("examples/")[1] for c in COMMANDS])
def test_readme_example_command_runs(command, example_runs):
    proc = example_runs[command].result()
    assert proc.returncode == 0, (
        f"{command} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" f"{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"{command} printed nothing"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_readme_api_snippet_runs_verbatim(tmp_path):
    section = README[README.index("## The API in one example") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "snippet.py").write_text(snippet)
    proc = run(f"torchrun --nproc-per-node 2 {tmp_path / 'snippet.py'}")
    assert proc.returncode == 0, f"the README's API example fails:\n{proc.stderr[-3000:]}"
