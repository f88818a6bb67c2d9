"""TokenFlowLoadVideo against the real clips and real PyAV (no mocks).

Relies on tests/conftest.py putting the ComfyUI host on sys.path and registering this repo as
the package ``comfyui_tokenflow``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_tokenflow.data import video_decode
from comfyui_tokenflow.nodes import video_nodes
from comfy_api.latest import io

VIDEOS = "/work/shared/videos"
WOLF = os.path.join(VIDEOS, "wolf.mp4")
WOLF_FRAMES = 40

pytestmark = pytest.mark.skipif(not os.path.exists(WOLF), reason="test clip wolf.mp4 is missing")


def _encode(path: str, frames: np.ndarray, codec: str, fps: int = 20, options: dict | None = None,
            pix_fmt: str = "yuv420p") -> None:
    """Write uint8 (N, H, W, 3) frames with PyAV."""
    with av.open(path, "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.bit_rate = 4_000_000
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _truncate(src: str, dst: str, fraction: float = 0.0, keep: int | None = None) -> str:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: keep if keep is not None else int(len(data) * fraction)])
    return dst


@pytest.fixture(scope="module")
def wolf_full() -> video_decode.LoadedVideo:
    return video_decode.load_video(WOLF)


@pytest.fixture(scope="module")
def small_frames(wolf_full) -> np.ndarray:
    """The wolf clip at 128x128, uint8, used to produce other formats quickly."""
    return _to_uint8(video_decode.load_video(WOLF, width=128).images)


@pytest.fixture(scope="module")
def made(tmp_path_factory, small_frames) -> dict[str, str]:
    """webm / mov / gif / faststart-mp4 / wide mp4 / numbered image folder made from wolf frames."""
    root = tmp_path_factory.mktemp("made")
    paths = {k: str(root / f"wolf.{k}") for k in ("webm", "mov", "gif")}
    _encode(paths["webm"], small_frames, "libvpx")
    _encode(paths["mov"], small_frames, "mpeg4")
    _encode(paths["gif"], small_frames, "gif", pix_fmt="rgb8")
    paths["faststart"] = str(root / "faststart.mp4")
    _encode(paths["faststart"], small_frames, "libx264", options={"movflags": "faststart"})
    paths["wide"] = str(root / "wide.mp4")  # 128x72, 16:9
    _encode(paths["wide"], np.ascontiguousarray(small_frames[:8, 28:100]), "libx264")
    folder = root / "seq"
    folder.mkdir()
    for i in range(12):  # frame_1.png .. frame_12.png, no zero padding
        Image.fromarray(small_frames[i]).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("not an image")
    paths["folder"] = str(folder)
    return paths


def test_wolf_full_load(wolf_full):
    assert wolf_full.frame_count == WOLF_FRAMES
    assert wolf_full.images.shape == (WOLF_FRAMES, 512, 512, 3)
    assert wolf_full.images.dtype == torch.float32
    assert 0.0 <= wolf_full.images.min().item() and wolf_full.images.max().item() <= 1.0
    assert wolf_full.fps == 20.0 and wolf_full.source_size == (512, 512)
    with av.open(WOLF) as container:  # same pixels as a plain PyAV decode
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert torch.equal(wolf_full.images[0], torch.from_numpy(first).float() / 255.0)


@pytest.mark.parametrize("cap,skip,nth", [(10, 0, 1), (0, 5, 1), (0, 0, 3), (5, 3, 4), (0, 37, 2), (100, 0, 7), (1, 39, 1)])
def test_cap_skip_stride_select_the_right_frames(wolf_full, cap, skip, nth):
    out = video_decode.load_video(WOLF, frame_load_cap=cap, skip_first_frames=skip, select_every_nth=nth)
    expected = list(range(skip, WOLF_FRAMES, nth))[: cap or None]
    assert out.frame_count == len(expected) == out.images.shape[0]
    assert out.fps == 20.0 / nth
    assert torch.equal(out.images, wolf_full.images[expected])


@pytest.mark.parametrize("src,req,multiple,expected", [
    ((1920, 1080), (512, 0), 64, (512, 320)),    # 288 -> 320 (4.5 multiples rounds up)
    ((1920, 1080), (0, 512), 64, (896, 512)),    # 910.2 -> 896
    ((1920, 1080), (500, 0), 8, (504, 280)),     # 500 -> 504, 281.25 -> 280
    ((1920, 1080), (0, 0), 64, (1920, 1088)),    # both 0: source size, rounded
    ((512, 512), (300, 0), 64, (320, 320)),
    ((512, 512), (300, 0), 8, (304, 304)),
    ((4000, 100), (512, 0), 64, (512, 64)),      # derived side never below one multiple
    ((640, 480), (320, 200), 8, (320, 200)),     # both given: aspect not preserved
])
def test_compute_output_size(src, req, multiple, expected):
    assert video_decode.compute_output_size(*src, *req, multiple) == expected


@pytest.mark.parametrize("width,height,multiple,shape", [(128, 0, 64, (128, 64)), (128, 0, 8, (128, 72)),
                                                         (0, 100, 8, (176, 104)), (0, 0, 64, (128, 64))])
def test_wide_clip_keeps_aspect_ratio_and_rounds(made, width, height, multiple, shape):
    out = video_decode.load_video(made["wide"], width=width, height=height, size_multiple=multiple)
    assert out.images.shape == (8, shape[1], shape[0], 3)
    assert out.source_size == (128, 72)
    assert 0.0 <= out.images.min().item() and out.images.max().item() <= 1.0


def test_resize_matches_downscaled_content(wolf_full):
    out = video_decode.load_video(WOLF, frame_load_cap=2, width=256, height=0)
    assert out.images.shape == (2, 256, 256, 3)
    pooled = torch.nn.functional.avg_pool2d(wolf_full.images[:2].permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert (out.images - pooled).abs().mean().item() < 0.02


@pytest.mark.parametrize("fmt,tolerance", [("webm", 0.03), ("mov", 0.03), ("gif", 0.08)])  # gif: 3-3-2 bit palette
def test_other_containers(made, small_frames, fmt, tolerance):
    out = video_decode.load_video(made[fmt])
    assert out.frame_count == WOLF_FRAMES and out.images.shape == (WOLF_FRAMES, 128, 128, 3)
    assert out.fps == pytest.approx(20.0)
    reference = torch.from_numpy(small_frames).float() / 255.0
    assert (out.images - reference).abs().mean().item() < tolerance
    closest = [int((reference - frame).abs().mean(dim=(1, 2, 3)).argmin()) for frame in out.images]
    assert closest == list(range(WOLF_FRAMES))  # every frame decoded in its place
    strided = video_decode.load_video(made[fmt], frame_load_cap=4, skip_first_frames=2, select_every_nth=5)
    assert strided.frame_count == 4 and strided.fps == pytest.approx(4.0)
    assert torch.equal(strided.images, out.images[[2, 7, 12, 17]])


def test_stream_without_frame_count_is_counted(tmp_path, small_frames):
    raw = str(tmp_path / "raw.h264")  # elementary stream: no frame count, no duration
    _encode(raw, small_frames, "libx264")
    with av.open(raw) as container:
        assert video_decode._estimate_total(container, container.streams.video[0], raw) == (WOLF_FRAMES, False)
    out = video_decode.load_video(raw, skip_first_frames=30, select_every_nth=3)
    assert out.frame_count == 4 and out.fps == pytest.approx(20.0 / 3)


def test_numbered_image_folder(made, small_frames):
    names = [os.path.basename(p) for p in video_decode.list_image_files(made["folder"])]
    assert names == [f"frame_{i}.png" for i in range(1, 13)]  # frame_2 before frame_10
    out = video_decode.load_video(made["folder"])
    assert out.frame_count == 12 and out.fps == video_decode.FOLDER_FPS
    assert torch.equal(out.images, torch.from_numpy(small_frames[:12]).float() / 255.0)
    part = video_decode.load_video(made["folder"], skip_first_frames=1, select_every_nth=4, width=64)
    assert part.images.shape == (3, 64, 64, 3)  # frames 2, 6, 10
    assert part.fps == video_decode.FOLDER_FPS / 4


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(ValueError, match="contains no images"):
        video_decode.load_video(str(tmp_path))


def test_zero_frames_after_skip(made):
    with pytest.raises(ValueError, match="skip_first_frames=40"):
        video_decode.load_video(WOLF, skip_first_frames=40)
    with pytest.raises(ValueError, match="skip_first_frames=12"):
        video_decode.load_video(made["folder"], skip_first_frames=12)


@pytest.mark.parametrize("content", [b"this is a text file, not a video\n" * 20, b""])
def test_unreadable_file(tmp_path, content):
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt, truncated or not a video"):
        video_decode.load_video(str(bogus))


def test_truncated_files(tmp_path, made):
    # moov atom at the end: a cut file cannot even be opened
    with pytest.raises(ValueError, match="corrupt, truncated"):
        video_decode.load_video(_truncate(WOLF, str(tmp_path / "cut.mp4"), 0.5))
    # faststart mp4 cut before its first frame: nothing decodable
    with pytest.raises(ValueError, match="No frame could be decoded"):
        with open(made["faststart"], "rb") as f:
            first_frame_at = f.read().index(b"mdat") + 4
        video_decode.load_video(_truncate(made["faststart"], str(tmp_path / "head.mp4"), keep=first_frame_at + 64))
    # faststart mp4 cut in the middle: refused where the user sees it (the node's error), naming the frame where
    # decoding fails and the frame_load_cap that loads the good part, which then gives exactly those frames
    full = video_decode.load_video(made["faststart"])
    half = _truncate(made["faststart"], str(tmp_path / "half.mp4"), 0.5)
    with pytest.raises(ValueError) as raised:
        video_nodes.TokenFlowLoadVideo.execute(video="", path=half)
    message = str(raised.value)
    good = int(re.search(r"decoding fails at frame (\d+) \(frames 1-(\d+) decode", message).group(2))
    assert 0 < good < WOLF_FRAMES and f"decoding fails at frame {good + 1}" in message, message
    assert "half.mp4' is truncated or corrupt" in message and f"announces {WOLF_FRAMES} frames" in message, message
    assert f"set frame_load_cap={good} to load only them" in message and "re-download" in message, message
    part = video_nodes.TokenFlowLoadVideo.execute(video="", path=half, frame_load_cap=good).args
    assert part[1] == good and torch.equal(part[0], full.images[:good])
    # with a stride, the count of SELECTED frames before the damage is what the cap needs
    with pytest.raises(ValueError, match=f"set frame_load_cap={len(range(0, good, 3))} to load only them"):
        video_decode.load_video(half, select_every_nth=3)


@pytest.mark.parametrize("fmt,codec,options", [("webm", "libvpx", None), ("mkv", "libx264", None)])
def test_cut_containers_without_a_frame_count_are_refused(tmp_path, small_frames, fmt, codec, options):
    """webm / mkv store no frame count: the frames ending well before the container's duration is the evidence."""
    whole = str(tmp_path / f"whole.{fmt}")
    _encode(whole, small_frames, codec, options=options)
    assert video_decode.load_video(whole).frame_count == WOLF_FRAMES  # the intact file is not refused
    with pytest.raises(ValueError, match=r"is truncated or corrupt: decoding fails at frame \d+ .* but the video "
                                         r"lasts 2\.00 s.*set frame_load_cap="):
        video_decode.load_video(_truncate(whole, str(tmp_path / f"cut.{fmt}"), 0.7))


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        video_decode.load_video(str(tmp_path / "nope.mp4"))
    message = video_nodes.TokenFlowLoadVideo.validate_inputs(video="", path=str(tmp_path / "nope.mp4"))
    assert isinstance(message, str) and "does not exist" in message
    assert video_nodes.TokenFlowLoadVideo.validate_inputs(video="", path=WOLF) is True


@pytest.mark.parametrize("kwargs,match", [
    ({"width": 9000}, "width=9000 is out of range"),
    ({"height": 16}, "height=16 is smaller than size_multiple=64"),
    ({"size_multiple": 12}, "size_multiple=12 is invalid"),
    ({"select_every_nth": 0}, "select_every_nth=0"),
])
def test_absurd_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        video_decode.load_video(WOLF, **kwargs)


def test_derived_size_too_large():
    with pytest.raises(ValueError, match="exceeds 8192"):
        video_decode.compute_output_size(1920, 1080, 0, 8192, 64)


def test_memory_refusal(monkeypatch, made):
    ten_frames = 10 * 512 * 512 * 3 * 4
    monkeypatch.setenv(video_decode.MAX_BYTES_ENV, str(ten_frames))
    calls = []
    with pytest.raises(ValueError, match=r"40 frames of 512x512 needs 0\.12 GiB.*frame_load_cap") as err:
        video_decode.load_video(WOLF, progress=lambda done, total: calls.append(done))
    assert "select_every_nth" in str(err.value) and "width/height" in str(err.value)
    assert calls == []  # refused before decoding anything
    assert video_decode.load_video(WOLF, frame_load_cap=10).frame_count == 10  # exactly at the limit
    assert video_decode.load_video(WOLF, select_every_nth=4).frame_count == 10
    monkeypatch.delenv(video_decode.MAX_BYTES_ENV)
    monkeypatch.setattr(video_decode, "MAX_BYTES", 5 * 128 * 128 * 12)
    with pytest.raises(ValueError, match="12 frames of 128x128"):
        video_decode.load_video(made["folder"])
    assert video_decode.load_video(made["folder"], frame_load_cap=5).frame_count == 5


def test_schema_has_tooltips_everywhere():
    schema = video_nodes.TokenFlowLoadVideo.define_schema()
    assert schema.node_id == "TokenFlowLoadVideo" and schema.display_name == "TokenFlow Load Video"
    assert schema.category == "TokenFlow" and schema.description
    assert [i.id for i in schema.inputs] == ["video", "path", "frame_load_cap", "skip_first_frames",
                                              "select_every_nth", "width", "height", "size_multiple"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert len(schema.outputs) == 3
    assert schema.inputs[0].as_dict()["video_upload"] is True
    assert video_nodes.NODES == [video_nodes.TokenFlowLoadVideo]


def test_node_execute_returns_three_outputs(tmp_path):
    out = video_nodes.TokenFlowLoadVideo.execute(video="", path=f'  "{WOLF}" ', frame_load_cap=8,
                                                 skip_first_frames=0, select_every_nth=2, width=256,
                                                 height=0, size_multiple=64)
    assert isinstance(out, io.NodeOutput) and len(out.args) == 3
    images, count, fps = out.args
    assert images.shape == (8, 256, 256, 3) and count == 8 and fps == 10.0


def test_node_lists_and_loads_input_folder_videos(tmp_path):
    import folder_paths
    shutil.copy(WOLF, tmp_path / "clip.mp4")
    (tmp_path / "still.png").write_bytes(b"")
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        assert video_nodes.list_input_videos() == ["clip.mp4"]
        assert video_nodes.TokenFlowLoadVideo.define_schema().inputs[0].options == ["clip.mp4"]
        assert video_nodes.TokenFlowLoadVideo.validate_inputs(video="clip.mp4", path="") is True
        images, count, fps = video_nodes.TokenFlowLoadVideo.execute(video="clip.mp4", frame_load_cap=3).args
        assert count == 3 and fps == 20.0 and images.shape == (3, 512, 512, 3)
        assert "missing.mp4" in video_nodes.TokenFlowLoadVideo.validate_inputs(video="missing.mp4", path="")
    finally:
        folder_paths.set_input_directory(previous)


def test_fingerprint_changes_with_the_file(tmp_path, made):
    clip = tmp_path / "clip.mp4"
    shutil.copy(WOLF, clip)
    node = video_nodes.TokenFlowLoadVideo
    before = node.fingerprint_inputs(video="", path=str(clip), frame_load_cap=0)
    assert before == node.fingerprint_inputs(video="", path=str(clip))
    with open(clip, "ab") as f:
        f.write(b"\0")
    os.utime(clip, ns=(os.stat(clip).st_atime_ns, os.stat(clip).st_mtime_ns + 10**9))
    assert node.fingerprint_inputs(video="", path=str(clip)) != before
    folder_before = node.fingerprint_inputs(video="", path=made["folder"])
    extra = os.path.join(made["folder"], "frame_13.png")
    shutil.copy(os.path.join(made["folder"], "frame_1.png"), extra)
    try:
        assert node.fingerprint_inputs(video="", path=made["folder"]) != folder_before
    finally:
        os.remove(extra)


def test_keeping_a_large_source_size_warns(tmp_path, caplog):
    folder = tmp_path / "large"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 1088, 3), dtype=np.uint8)).save(folder / "frame_1.png")
    with caplog.at_level(logging.WARNING, logger=video_decode.__name__):
        assert video_decode.load_video(str(folder), width=0, height=0).images.shape == (1, 64, 1088, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("width and height are 0" in m and "source size 1088x64" in m and "set width (e.g. 512)" in m
               for m in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=video_decode.__name__):
        video_decode.load_video(str(folder), width=512)  # a size was chosen: no warning
        video_decode.load_video(WOLF, frame_load_cap=1)  # a 512 px source kept: no warning
    assert not [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
