"""Progress on stderr: a tqdm bar on a terminal, whole readable lines in a log file (``2>log``),
nothing with ``--quiet``."""

import io
import os
import subprocess
import sys

import numpy as np
import onnx
from tiny_models import tiny_cnn, tiny_images

from tvm_ternary.progress import Progress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_mode_writes_whole_lines_with_count_rate_and_time_left():
    log = io.StringIO()
    with Progress(5, desc="calibrating", unit="images", stream=log, log_interval=0.0) as bar:
        for _ in range(5):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5
    assert lines[-1].startswith("calibrating: 5/5 images (100%) [00:00<00:00, ") and lines[-1].endswith("images/s]")
    assert lines[1].startswith("calibrating: 2/5 images (40%)")


def test_log_mode_is_throttled_and_always_ends_with_a_final_line():
    log = io.StringIO()
    with Progress(1000, desc="eval", unit="images", stream=log, log_interval=3600) as bar:
        for _ in range(999):
            bar.update(1)
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[-1]]  # only the final one
    assert log.getvalue().startswith("eval: 999/1000 images (100%)")


def test_terminal_mode_draws_a_tqdm_bar_and_quiet_prints_nothing():
    tty = Terminal()
    with progress(4, desc="quantizing layers", unit="layers", stream=tty) as bar:
        bar.update(4)
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue() and "quantizing layers" in tty.getvalue()
    for stream in (Terminal(), io.StringIO()):
        with progress(4, desc="x", stream=stream, enabled=False) as bar:
            bar.update(4)
            bar.write("hidden")
        assert stream.getvalue() == ""


def test_compile_progress_in_a_log_file_is_readable_lines(tmp_path):
    onnx.save(tiny_cnn(), tmp_path / "tiny.onnx")
    np.save(tmp_path / "calib.npy", tiny_images(4))
    command = [sys.executable, "-m", "tvm_ternary", "compile", str(tmp_path / "tiny.onnx"), "-o",
               str(tmp_path / "tiny.so"), "--calib", str(tmp_path / "calib.npy"), "--method", "exact"]
    with open(tmp_path / "log", "w") as log:
        subprocess.run(command, stderr=log, stdout=subprocess.DEVNULL, check=True, env=dict(os.environ))
    text = (tmp_path / "log").read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert any(line.startswith("calibrating: 4/4 images (100%)") for line in lines), text
    assert any(line.startswith("quantizing layers: 8/8 layers (100%)") for line in lines), text
    assert max(len(line) for line in lines) < 200  # no line holding several updates
    quiet = subprocess.run(command + ["--quiet"], capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
