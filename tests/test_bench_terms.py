"""benchmarks/bench_terms.py runs end to end on the real models and prints every row and
ratio it promises (a structure check with tiny settings: its figures are not judged here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_terms.py"


@pytest.mark.real
@pytest.mark.slow
def test_bench_terms_prints_every_row_and_ratio(smollm2_path, gemma3_path):
    proc = subprocess.run([sys.executable, "-P", str(BENCH), "--tokens", "2", "--rounds", "1",
                           "--memory-n-ctx", "1024"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for config in ("base", "smollm2", "base+2", "base+3", "base+3-concurrent", "base+cfg"):
        assert re.search(rf"^{re.escape(config)}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+%\s+\d+$", out, re.M), out
    for ratio in ("base + 2 terms vs ideal", "base + 3 terms", "concurrent vs sequential"):
        assert re.search(rf"{re.escape(ratio)}.*: [\d.]+x$", out, re.M), out
    assert re.search(r"fusion \+ sampling share of a 3-term step: [\d.]+%$", out, re.M), out
    # CFG: the weights are loaded once, and its memory is measured at both window sizes
    cfg = re.findall(r"^CFG at n_ctx (\d+): 1 model loaded; extra peak RSS [-\d.]+ MB vs its KV cache "
                     r"([\d.]+) MB", out, re.M)
    assert [n for n, _ in cfg] == ["512", "1024"], out
    assert float(cfg[1][1]) > float(cfg[0][1]) > 0, out   # a larger window, a larger KV cache
