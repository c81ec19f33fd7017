"""The report page opened in a real headless browser (Chromium): it renders, and its embedded plots show."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from posttrain.cli import main

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and os.access(p, os.X_OK)), None)
SCREENSHOT_DIR = os.environ.get("POSTTRAIN_SCREENSHOT_DIR")  # keep the screenshots (to look at them)


def _short_sft(tmp_path: Path, name: str, lr: float) -> Path:
    recipe = {
        "model": "builtin:tiny-qwen2-arith",
        "data": {"train": {"source": "builtin:arithmetic-sft", "options": {"num_samples": 128, "max_operand": 30}},
                 "test": {"source": "builtin:arithmetic-rl", "split": "test", "max_samples": 16,
                          "options": {"max_operand": 30}}},
        "method": {"name": "sft"},
        "training": {"max_steps": 8, "logging_steps": 1, "save_steps": 8, "per_device_train_batch_size": 8,
                     "learning_rate": lr, "disable_tqdm": True},
        "eval": {"steps": 2},
        "output_dir": str(tmp_path / name),
        "seed": 0,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    return tmp_path / name


def _screenshot(page: Path, out: Path, tmp_path: Path, size=(1400, 2400)) -> np.ndarray:
    from PIL import Image

    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.is_file(), proc.stderr[-2000:]
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(SCREENSHOT_DIR) / out.name)
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int32)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(tmp_path):
    a = _short_sft(tmp_path, "lr-1e-3", 1.0e-3)
    b = _short_sft(tmp_path, "lr-3e-3", 3.0e-3)
    page = tmp_path / "compare.html"
    assert main(["report", str(a), str(b), "--output", str(page)]) == 0

    for html, shot, colours in ((a / "report.html", tmp_path / "single.png", [(31, 119, 180)]),
                                (page, tmp_path / "compare.png", [(31, 119, 180), (255, 127, 14)])):
        pixels = _screenshot(html, shot, tmp_path)
        assert pixels.shape[:2] == (2400, 1400)
        # not blank: some non-white content, in more than one colour
        non_white = (pixels < 235).any(axis=-1).mean()
        assert non_white > 0.02 and pixels.std() > 10, (non_white, pixels.std())
        # the embedded plots are drawn, not broken images: the runs' line colours (matplotlib's C0 blue and, for the
        # second run, C1 orange) cover many pixels
        for colour in colours:
            close = (np.abs(pixels - np.array(colour)).sum(axis=-1) < 30).sum()
            assert close > 2000, (shot.name, colour, close)
