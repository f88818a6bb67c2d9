"""scripts/consistency_report.py reads frames with the pack's decoder (data/video_decode.py), as TokenFlow Load Video
does, and prints its table."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_tokenflow.data import video_decode

pytest.importorskip("cv2")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("consistency_report_under_test", REPO / "scripts/consistency_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(path: Path, names: list[str], seed: int = 0) -> list[np.ndarray]:
    path.mkdir()
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in names]
    for name, frame in zip(names, frames):
        Image.fromarray(frame).save(path / name)
    return frames


def test_a_folder_is_read_as_the_loader_reads_it(report, tmp_path):
    # Natural sort of the whole name gives a2, b1, c10; the loader orders by the last number: b1, a2, c10.
    frames = _folder(tmp_path / "clip", ["a2.png", "b1.png", "c10.png"])
    loaded = report.load_video(tmp_path / "clip")
    assert torch.equal(loaded, video_decode.load_video(str(tmp_path / "clip"), size_multiple=8).images)
    assert torch.equal(loaded[0], torch.from_numpy(frames[1]).float() / 255.0)
    assert report.load_video(tmp_path / "clip", max_frames=1, start=1).shape[0] == 1


def test_the_report_prints_one_row_per_video(report, tmp_path, capsys):
    _folder(tmp_path / "source", [f"f{i}.png" for i in range(4)], seed=1)
    _folder(tmp_path / "edit", [f"f{i}.png" for i in range(4)], seed=2)
    report.main(["--source", str(tmp_path / "source"), f"edit={tmp_path / 'edit'}", "--flow", "ultrafast"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| video", "| source", "| edit"]
    assert all("40x32" in row for row in rows[1:])


def test_a_missing_video_is_one_line(report, tmp_path):
    with pytest.raises(SystemExit, match="Video not found"):
        report.load_video(tmp_path / "nothing.mp4")
