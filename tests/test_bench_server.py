"""benchmarks/bench_server.py runs end to end on the real model and prints every row and ratio
it promises (a structure check with tiny settings: its figures are not judged here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"


@pytest.mark.real
@pytest.mark.slow
def test_bench_server_prints_every_row_and_ratio(smollm2_path):
    pytest.importorskip("fastapi")
    proc = subprocess.run([sys.executable, "-P", str(BENCH), "--tokens", "4", "--clients", "1,2", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    row = r"\s+{n}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+$"
    assert re.search(r"^python-api" + row.format(n=1), out, re.M), out
    for slots in (1, 2):
        for n in (1, 2):
            assert re.search(rf"^serve --slots {slots}" + row.format(n=n), out, re.M), out
            assert re.search(rf"^serve --slots {slots}, {n} clients? vs python-api: [\d.]+x$", out, re.M), out
    for n in (1, 2):
        assert re.search(rf"^--slots 2 vs --slots 1, {n} clients?: [\d.]+x$", out, re.M), out
