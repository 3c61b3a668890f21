"""benchmarks/bench_spec.py runs end to end on the real models and prints every row it promises
(a structure check with tiny settings: its speeds are not judged here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_spec.py"
NUMBER = r"[\d.]+"


@pytest.mark.real
@pytest.mark.slow
def test_bench_spec_prints_every_row(smollm2_path, gemma3_path):
    proc = subprocess.run([sys.executable, "-P", str(BENCH), "--tokens", "6", "--rounds", "1", "--families",
                           "gemma", "--threads", "1"], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    # the price of a verified position, measured on the base
    assert re.search(rf"^# gemma3-270m: 1 token {NUMBER} ms, 1\+4 tokens {NUMBER} ms \({NUMBER} of a step per "
                     rf"position\), 1\+8 tokens {NUMBER} ms", out, re.M), out
    for composition in ("gemma base", "gemma + smollm2"):
        for prompt in ("code", "story", "quote"):
            # plain, then n-gram drafts (speed, ratio, acceptance, CPU, ratio); no draft model for Gemma
            row = (rf"^{re.escape(composition)}\s+{prompt}\s+{NUMBER}\s+{NUMBER} \|\s+{NUMBER}\s+{NUMBER}\s+"
                   rf"\d+%\s+{NUMBER}\s+{NUMBER} \|\s+-\s+-\s+-\s+-\s+- \| (yes|NO)$")
            assert re.search(row, out, re.M), (composition, prompt, out)
    assert re.search(r"^# load average at the end [\d.]+$", out, re.M), out
