"""The benchmarks run (on the smallest settings); what they measure is not checked."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_throughput_loop_prints_the_loop_and_bare_step_rates_and_their_ratio():
    # Two epochs: the first compiles and is not counted, so one is timed; --seconds 2 makes it ~1 s.
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--loop", "--configs", "smoke", "--device", "cpu",
         "--epochs", "2", "--seconds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    number = r"([\d,.]+)"
    found = re.search(rf"^smoke: loop {number} images/s .*\| bare step {number} images/s \| loop / step {number}",
                      result.stdout, re.MULTILINE)
    assert found, result.stdout[-3000:]
    loop, step, ratio = (float(text.replace(",", "")) for text in found.groups())
    assert loop > 0 and step > 0 and ratio > 0
