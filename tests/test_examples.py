"""The examples in examples/ run end to end (on tiny data)."""

import os
import runpy
from pathlib import Path

import pytest

from tests.conftest import write_image_folder

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_trains_plots_evaluates_and_draws_attention(tmp_path, monkeypatch, capsys):
    images = write_image_folder(tmp_path / "images", per_class=12)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("VITLAB_DATA", f"folder:{images}")
    monkeypatch.setenv("VITLAB_MAX_TIME", "00:00:03")
    monkeypatch.setenv("VITLAB_RUN_DIR", str(run_dir))
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "eval on 4 held-out images" in out
    assert (run_dir / "curves.png").stat().st_size > 0 and (run_dir / "attention.png").stat().st_size > 0
    assert os.path.isfile(run_dir / "checkpoints" / "best.ckpt")
