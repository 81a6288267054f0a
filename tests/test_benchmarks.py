"""The benchmarks run (on the smallest settings) and what they print adds up: the figures are
derived from one another and from the images the run trained as they say. How fast is not checked."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vitlab import config as configs

ROOT = Path(__file__).parent.parent


def test_throughput_loop_prints_the_loop_and_bare_step_rates_and_their_ratio():
    # Two epochs: the first compiles and is not counted, so one is timed; --seconds 2 makes it ~1 s.
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--loop", "--configs", "smoke", "--device", "cpu",
         "--epochs", "2", "--seconds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    def figures(pattern):
        found = re.search(pattern.replace("NUMBER", r"([\d,]+(?:\.\d+)?)"), out, re.MULTILINE)
        assert found, f"no line matching {pattern!r} in:\n{out[-3000:]}"
        return [float(text.replace(",", "")) for text in found.groups()]

    # The smoke preset is what was measured.
    smoke = configs.resolve("smoke")
    batch = smoke.data.batch_size
    assert re.search(rf"^smoke: dim {smoke.model.dim}, depth {smoke.model.depth}, tokenizer {smoke.model.tokenizer}, "
                     rf"batch {batch}, precision 32-true, eager$", out, re.MULTILINE), out[-3000:]
    [before] = figures(r"^  bare step: NUMBER images/s$")
    [after] = figures(r"^  bare step after the run: NUMBER images/s$")
    loop, median, step, ratio, median_ratio = figures(
        r"^smoke: loop NUMBER images/s \(median NUMBER\) \| bare step NUMBER images/s \| "
        r"loop / step NUMBER \(median NUMBER; target >= 0.90 on a GPU\)$")
    # The step's rate is the better of its two timings; --epochs 2 times one epoch, its own median.
    assert step == max(before, after) and median == loop and median_ratio == ratio
    # The ratio is of the rates printed (each rounded to a whole number, the ratio to 2 decimals).
    assert ratio == pytest.approx(loop / step, abs=0.005 + 1.01 * (loop / step) * (0.5 / loop + 0.5 / step))
    # The loop's rate is an epoch's images over its time: at least --seconds / 2 of the bare step's rate
    # (and 4 batches), in full batches only (the split held out rounds, so one image more may be trained
    # on), over the difference of metrics.csv's elapsed_s, which has 0.1 s steps.
    wanted = max(4 * batch, before * 2 / 2)  # --seconds 2
    epoch_images = {int(wanted) // batch * batch, (int(wanted) + 1) // batch * batch}
    seconds = {images: images / loop for images in epoch_images}
    tolerance = {images: 1.01 * images * 0.5 / (loop * (loop - 0.5)) + 1e-9 for images in epoch_images}
    assert any(round(s, 1) > 0 and abs(s - round(s, 1)) <= tolerance[images] for images, s in seconds.items()), (
        f"{loop:,.0f} images/s is not {sorted(epoch_images)} images per a multiple of 0.1 s: {seconds}")
