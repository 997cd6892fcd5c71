"""Every benchmark's tiny CPU mode runs to completion and writes its JSON, so none can rot unseen."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ["layer.py", "transport.py", "train_throughput.py", "coe_compare.py", "compression_report.py"]


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_smoke(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    written = list(tmp_path.rglob("*.json"))
    assert written, f"{script} --smoke --out wrote no JSON"
    for path in written:
        assert json.loads(path.read_text()), f"{path} is empty"
