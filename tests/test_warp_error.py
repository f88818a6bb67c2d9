"""The TokenFlow paper's temporal-consistency metric: warp error, occlusion mask, DIS flow, node.

Everything runs on real data: a wolf.mp4 texture moved by known translations, real wolf.mp4
frames, per-frame JPEG re-encoding as a codec-like (VAE-like) per-frame degradation, and a
brute-force per-pixel numpy restatement of the metric.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_tokenflow.metric import warp_error as we

av = pytest.importorskip("av")
pytest.importorskip("cv2")

from comfyui_tokenflow.metric import consistency, flow_estimation  # noqa: E402
from comfyui_tokenflow.nodes import consistency_nodes  # noqa: E402

WOLF = Path("/work/shared/videos/wolf.mp4")
SHUFFLE = [4, 0, 7, 3, 2, 5, 1, 6]


# ---------------------------------------------------------------- data helpers

def load_frames(path: Path, count: int, size: int) -> torch.Tensor:
    """First ``count`` frames decoded with PyAV, resized to size x size: (N, H, W, 3) float in [0, 1]."""
    if not path.exists():
        pytest.skip(f"test video {path} not available")
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(np.asarray(frame.to_image().resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0)
            if len(frames) == count:
                break
    return torch.from_numpy(np.stack(frames))


def jpeg_per_frame(frames: torch.Tensor, quality: int = 60) -> torch.Tensor:
    """Independent JPEG round trip of every frame (a deterministic, codec-like per-frame degradation)."""
    out = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray((frame.numpy() * 255.0).round().astype(np.uint8)).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out))


@pytest.fixture(scope="module")
def wolf() -> torch.Tensor:
    return load_frames(WOLF, 8, 128)


@pytest.fixture(scope="module")
def texture() -> torch.Tensor:
    """A lightly smoothed 256x256 wolf frame, (1, 3, H, W)."""
    frame = load_frames(WOLF, 1, 256).permute(0, 3, 1, 2)
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 256.0
    return F.conv2d(F.pad(frame, (2, 2, 2, 2), mode="replicate"), kernel.expand(3, 1, 5, 5).contiguous(), groups=3)


def translated_video(texture: torch.Tensor, shift: tuple[float, float], count: int = 8, size: int = 128,
                     offset: float = 32.0) -> torch.Tensor:
    """frame_t(p) = texture(p + offset + t * shift), bilinear: (N, 3, size, size).

    The true flow t -> t+1 is ``-shift`` everywhere and t+1 -> t is ``+shift``.
    """
    height, width = texture.shape[-2:]
    frames = []
    for t in range(count):
        target = we.pixel_grid(size, size).unsqueeze(0)
        target = target + torch.tensor([offset + t * shift[0], offset + t * shift[1]]).view(1, 2, 1, 1)
        grid = torch.stack((2 * target[:, 0] / (width - 1) - 1, 2 * target[:, 1] / (height - 1) - 1), dim=-1)
        frames.append(F.grid_sample(texture, grid, mode="bilinear", align_corners=True))
    return torch.cat(frames)


def dis_flows(frames_nchw: torch.Tensor, method: str = "medium") -> tuple[torch.Tensor, torch.Tensor]:
    return flow_estimation.estimate_flows(frames_nchw.permute(0, 2, 3, 1), method)


# ---------------------------------------------------------------- brute force restatement

def _bilinear(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """image (C, H, W) at real (x, y) inside the frame."""
    height, width = image.shape[1:]
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fx) * (1 - fy) * image[:, y0, x0] + fx * (1 - fy) * image[:, y0, x1]
            + (1 - fx) * fy * image[:, y1, x0] + fx * fy * image[:, y1, x1])


def brute_force(frames: np.ndarray, fwd: np.ndarray, bwd: np.ndarray):
    """Per-pixel loop: per-pair MSE, excluded fraction, occluded and inside masks."""
    n, channels, height, width = frames.shape
    errors, excluded, occluded_masks, inside_masks = [], [], [], []
    for i in range(n - 1):
        total, count = 0.0, 0
        occluded = np.zeros((height, width), bool)
        inside = np.zeros((height, width), bool)
        for y in range(height):
            for x in range(width):
                u, v = fwd[i, 0, y, x], fwd[i, 1, y, x]
                tx, ty = x + u, y + v
                if not (0 <= tx <= width - 1 and 0 <= ty <= height - 1):
                    continue
                inside[y, x] = True
                b = _bilinear(bwd[i], tx, ty)
                mismatch = (u + b[0]) ** 2 + (v + b[1]) ** 2
                if mismatch > 0.01 * (u * u + v * v + b[0] ** 2 + b[1] ** 2) + 0.5:
                    occluded[y, x] = True
                    continue
                total += float(((_bilinear(frames[i + 1], tx, ty) - frames[i, :, y, x]) ** 2).sum())
                count += 1
        errors.append(total / (channels * count) if count else float("nan"))
        excluded.append(1.0 - count / (height * width))
        occluded_masks.append(occluded)
        inside_masks.append(inside)
    return np.array(errors), np.array(excluded), np.stack(occluded_masks), np.stack(inside_masks)


def test_matches_brute_force_on_random_flows() -> None:
    gen = torch.Generator().manual_seed(0)
    n, height, width = 3, 7, 9
    frames = torch.rand(n, 3, height, width, generator=gen, dtype=torch.float64)
    fwd = (torch.rand(n - 1, 2, height, width, generator=gen, dtype=torch.float64) * 2 - 1) * 3.0
    small = (torch.rand(n - 1, 2, height, width, generator=gen, dtype=torch.float64) * 2 - 1) * 0.2
    large = (torch.rand(n - 1, 2, height, width, generator=gen, dtype=torch.float64) * 2 - 1) * 3.0
    pick = torch.rand(n - 1, 1, height, width, generator=gen, dtype=torch.float64) < 0.5
    bwd = -fwd + torch.where(pick, large, small)

    result = we.warp_error(frames, fwd, bwd, chunk=1)
    errors, excluded, occluded, inside = brute_force(frames.numpy(), fwd.numpy(), bwd.numpy())
    assert occluded.any() and (inside & ~occluded).any() and (~inside).any()  # all three cases exercised
    # float64 vectorised vs a float64 per-pixel loop: summation order only (observed 0 of these bounds)
    np.testing.assert_allclose(result.per_pair.numpy(), errors, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.excluded_fraction.numpy(), excluded, rtol=1e-12, atol=1e-12)
    assert result.mean == pytest.approx(float(errors.mean()), rel=1e-10)

    occ_t, inside_t = we.occlusion_mask(fwd, bwd)
    np.testing.assert_array_equal(occ_t.numpy(), occluded)
    np.testing.assert_array_equal(inside_t.numpy(), inside)


def test_exact_occlusion_masks_replace_the_forward_backward_check() -> None:
    """A rendered clip knows its occlusion: given masks replace step 3, the out-of-frame mask still applies."""
    gen = torch.Generator().manual_seed(1)
    n, height, width = 3, 7, 9
    frames = torch.rand(n, 3, height, width, generator=gen, dtype=torch.float64)
    fwd = (torch.rand(n - 1, 2, height, width, generator=gen, dtype=torch.float64) * 2 - 1) * 3.0
    bwd = fwd.clone()  # inconsistent everywhere: the check alone would flag almost every moving pixel
    given = torch.rand(n - 1, height, width, generator=gen) < 0.3

    result = we.warp_error(frames, fwd, bwd, chunk=1, occlusion=given)
    *_, inside = brute_force(frames.numpy(), fwd.numpy(), bwd.numpy())
    image, flow = frames.numpy(), fwd.numpy()
    for i in range(n - 1):
        valid = inside[i] & ~given[i].numpy()
        squared = [((_bilinear(image[i + 1], x + flow[i, 0, y, x], y + flow[i, 1, y, x]) - image[i, :, y, x]) ** 2).sum()
                   for y, x in zip(*np.nonzero(valid))]
        assert result.per_pair[i].item() == pytest.approx(sum(squared) / (3 * valid.sum()), rel=1e-10)
        assert result.excluded_fraction[i].item() == pytest.approx(1 - valid.sum() / (height * width), rel=1e-12)
    assert abs(result.mean - we.warp_error(frames, fwd, bwd).mean) > 1e-3  # the check's masks differ
    with pytest.raises(ValueError, match="occlusion masks"):
        we.warp_error(frames, fwd, bwd, occlusion=given[:, :-1])


def test_occlusion_mask_consistent_and_inconsistent_flows() -> None:
    fwd = torch.zeros(1, 2, 6, 8)
    fwd[:, 0] = 1.0
    occluded, inside = we.occlusion_mask(fwd, -fwd)
    assert not occluded.any()
    assert inside[0, :, :-1].all() and not inside[0, :, -1].any()  # the last column moves out of the frame
    occluded, _ = we.occlusion_mask(fwd, fwd.clone())  # |f + b|^2 = 4 > 0.01 * 2 + 0.5
    assert occluded[0, :, :-1].all() and not occluded[0, :, -1].any()
    slightly_off = -fwd + 0.3  # |f + b|^2 = 0.18 < 0.5: tolerated
    assert not we.occlusion_mask(fwd, slightly_off)[0].any()


def test_backward_warp_integer_shift_is_exact() -> None:
    image = torch.rand(2, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    flow = torch.zeros(2, 2, 10, 12)
    flow[:, 0], flow[:, 1] = 2.0, -1.0
    warped, inside = we.backward_warp(image, flow)
    torch.testing.assert_close(warped[:, :, 1:, :-2], image[:, :, :-1, 2:])  # float32 defaults: grid_sample's coordinate rounding
    assert inside[:, 1:, :-2].all() and not inside[:, 0].any() and not inside[:, :, -2:].any()


# ---------------------------------------------------------------- synthetic translations

@pytest.mark.parametrize("shift", [(2.0, 1.0), (1.5, -0.75)])
def test_translated_video_scores_about_zero(texture: torch.Tensor, shift: tuple[float, float]) -> None:
    video = translated_video(texture, shift)
    true_fwd = torch.zeros(video.shape[0] - 1, 2, *video.shape[-2:])
    true_fwd[:, 0], true_fwd[:, 1] = -shift[0], -shift[1]
    exact = we.warp_error(video, true_fwd, -true_fwd)
    if float(shift[0]).is_integer() and float(shift[1]).is_integer():
        assert exact.scaled < 1e-6
    assert exact.scaled < 0.05

    fwd, bwd = dis_flows(video)
    assert (fwd[:, :, 16:-16, 16:-16] - true_fwd[:, :, 16:-16, 16:-16]).abs().mean() < 0.1
    recoloured = video[:, [2, 0, 1]].pow(0.7)  # an "edit" applied identically to every frame
    for edited in (video, recoloured):
        result = we.warp_error(edited, fwd, bwd)
        assert result.scaled < 0.1
        assert 0.0 < result.mean_excluded < 0.1  # the border strip entering the frame is masked

    shuffled = we.warp_error(video[SHUFFLE], fwd, bwd)
    assert shuffled.scaled > 10 * max(we.warp_error(recoloured, fwd, bwd).scaled, 0.1)


def test_real_video_shuffled_scores_far_higher(wolf: torch.Tensor) -> None:
    fwd, bwd = flow_estimation.estimate_flows(wolf, "medium")
    frames = wolf.permute(0, 3, 1, 2)
    ordered = we.warp_error(frames, fwd, bwd)
    shuffled = we.warp_error(frames[SHUFFLE], fwd, bwd)
    assert ordered.scaled < 1.0
    assert shuffled.scaled > 10 * ordered.scaled


def test_per_frame_codec_round_trip_scores_low_but_nonzero(wolf: torch.Tensor) -> None:
    """Per-frame JPEG q60 as the stand-in for a per-frame VAE round trip (the paper: VAE 2.0 vs per-frame 11.3).

    The source itself scores the flow-estimation floor; independent per-frame degradation raises
    it a little, but stays far below an inconsistent per-frame edit (random colour gain per frame).
    """
    fwd, bwd = flow_estimation.estimate_flows(wolf, "medium")
    floor = we.warp_error(wolf.permute(0, 3, 1, 2), fwd, bwd).scaled
    coded = jpeg_per_frame(wolf)
    codec = we.warp_error(coded.permute(0, 3, 1, 2), fwd, bwd).scaled
    codec_mse = float((coded - wolf).square().mean()) * we.PAPER_SCALE
    assert codec_mse > 0.1  # the degradation is real
    assert floor < codec < 3 * floor
    assert codec < floor + 2 * codec_mse  # at most what independent per-frame noise of that size adds

    gains = 1 + 0.15 * (torch.rand(wolf.shape[0], 1, 1, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    flicker = we.warp_error((wolf * gains).clamp(0, 1).permute(0, 3, 1, 2), fwd, bwd).scaled
    assert flicker > 3 * codec


# ---------------------------------------------------------------- flow estimators

def test_dis_presets_and_errors() -> None:
    frames = translated_video(torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2)), (1.0, 0.0),
                              count=2, size=32, offset=8).permute(0, 2, 3, 1)
    for preset in ("ultrafast", "fast", "medium"):
        fwd, bwd = flow_estimation.estimate_flows(frames, preset)
        assert fwd.shape == bwd.shape == (1, 2, 32, 32) and fwd.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown flow method"):
        flow_estimation.make_estimator("slow")
    with pytest.raises(ValueError, match="too small"):
        flow_estimation.estimate_flows(torch.rand(2, 8, 8, 3), "medium")
    assert flow_estimation.available_methods()[:3] == ["ultrafast", "fast", "medium"]


def test_raft_code_path_runs_with_random_weights() -> None:
    pytest.importorskip("torchvision")
    raft = flow_estimation.RAFTFlow("raft_small", pretrained=False, iterations=1)
    fwd, bwd = raft.pair(torch.rand(20, 28, 3), torch.rand(20, 28, 3))
    assert fwd.shape == bwd.shape == (2, 20, 28) and torch.isfinite(fwd).all()


# ---------------------------------------------------------------- node

def test_node_execute_outputs_and_plot(texture: torch.Tensor, test_artifacts: Path) -> None:
    source = translated_video(texture, (2.0, 1.0), count=5, size=48).permute(0, 2, 3, 1)
    edited = source.flip(-1)  # channel swap applied to every frame: consistent
    out = consistency_nodes.TokenFlowTemporalConsistency.execute(edited, source, "fast")
    warp_err, occluded, plot = out.args
    assert isinstance(warp_err, float) and 0.0 <= warp_err < 0.1
    assert isinstance(occluded, float) and 0.0 < occluded < 0.2
    assert plot.shape == (1, consistency.PLOT_HEIGHT, consistency.PLOT_WIDTH, 3)
    assert plot.dtype == torch.float32 and 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    assert float(plot.std()) > 0.05  # something was drawn
    Image.fromarray((plot[0].numpy() * 255).round().astype(np.uint8)).save(test_artifacts / "warp_error_plot.png")
    assert out.ui is not None

    shuffled = consistency_nodes.TokenFlowTemporalConsistency.execute(edited[[3, 0, 4, 1, 2]], source).args[0]
    assert shuffled > 10 * max(warp_err, 0.1)


def test_node_schema_has_tooltips() -> None:
    schema = consistency_nodes.TokenFlowTemporalConsistency.define_schema()
    assert schema.category == "TokenFlow" and schema.description and schema.is_output_node
    assert [i.id for i in schema.inputs] == ["edited_frames", "source_frames", "flow_preset"]
    assert [o.id for o in schema.outputs] == ["warp_error", "occluded_fraction", "plot"]
    assert all(item.tooltip for item in schema.inputs + schema.outputs)
    assert consistency_nodes.NODES == [consistency_nodes.TokenFlowTemporalConsistency]


@pytest.mark.parametrize("edited, source, message", [
    (torch.rand(4, 32, 32, 3), torch.rand(5, 32, 32, 3), "4 frames but source_frames has 5"),
    (torch.rand(4, 32, 32, 3), torch.rand(4, 32, 40, 3), "ImageScale"),
    (torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), "at least 2"),
    (torch.full((3, 32, 32, 3), float("nan")), torch.rand(3, 32, 32, 3), "edited_frames contains NaN"),
    (torch.rand(3, 32, 32, 3), torch.full((3, 32, 32, 3), float("nan")), "source_frames contains NaN"),
])
def test_node_errors(edited: torch.Tensor, source: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        consistency_nodes.TokenFlowTemporalConsistency.execute(edited, source)


def test_render_plot_handles_long_videos_and_nan() -> None:
    values = [float(v) for v in np.linspace(0.5, 4.0, 39)]
    values[5] = float("nan")
    plot = consistency.render_plot(values, 2.0, 0.05)
    assert plot.shape == (1, consistency.PLOT_HEIGHT, consistency.PLOT_WIDTH, 3)
