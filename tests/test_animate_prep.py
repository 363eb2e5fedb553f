"""`wanlite animate-prep`, end to end with tiny ONNX models of the official signatures
(wanlite.testing.prep_models): a white dot moving right stands in for the performer."""
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from wanlite.cli import main
from wanlite import animate_prep as ap
from wanlite.pipelines.animate import read_sources
from wanlite.pipelines.video_io import read_mp4, write_mp4
from wanlite.testing.inputs import write_png_header
from wanlite.testing.prep_models import standing_pose, write_prep_models

H, W, N = 96, 128, 12


def _dot(i):  # centre of the 8x8 dot in frame i, in pixels
    return 30 + 5 * i - 0.5, 47.5


@pytest.fixture(scope="module")
def prep_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    frames = np.zeros((N, H, W, 3), np.uint8)
    for i in range(N):
        x, y = int(_dot(i)[0] + 0.5), int(_dot(i)[1] + 0.5)
        frames[i, y - 4:y + 4, x - 4:x + 4] = 255
    write_mp4(frames, root / "drive.mp4", 30)
    Image.fromarray(np.full((96, 64, 3), 128, np.uint8)).save(root / "ref.png")
    write_prep_models(root / "ckpt")
    return root


def test_size_and_frame_rules_follow_the_official_preprocessing():
    assert ap.area_size(1920, 1080, 1280 * 720) == (1280, 720)
    assert ap.area_size(1080, 1920, 1280 * 720) == (720, 1280)
    assert ap.area_size(64, 96, 128 * 96) == (80, 128)
    assert ap.sample_indices(8, 60, 30) == [0, 2, 4, 6]
    assert ap.sample_indices(5, 24, 30) == [0, 1, 2, 2, 3, 4]  # 24 -> 30 fps repeats a frame
    assert ap.sample_indices(90, 30, 30) == list(range(90))


@pytest.mark.parametrize("count, src, dst", [(40, 60, 30), (30, 24, 30), (31, 30, 16)])
def test_streamed_frame_sampling_picks_the_official_indices(tmp_path, count, src, dst):
    frames = np.zeros((count, 16, 64, 3), np.uint8)
    for i in range(count):
        frames[i, :, i] = 255  # frame i: a white column at x = i
    write_mp4(frames, tmp_path / "v.mp4", src)
    got, fps = ap.read_driving_video(tmp_path / "v.mp4", dst)
    assert fps == dst
    assert [int(f[..., 0].mean(0).argmax()) for f in got] == ap.sample_indices(count, src, dst)


def test_grid_fill_makes_the_box_by_default_and_cells_on_a_finer_grid():
    mask = np.zeros((20, 20), np.uint8)
    mask[2, 3] = mask[15, 16] = 1
    box = ap.fill_to_grid(mask, (1, 1))
    assert box[2:15, 3:16].all() and box.sum() == 13 * 13 + 1  # the official fill stops short of the last row/col
    cells = ap.fill_to_grid(mask, (2, 2))
    assert cells[2:8, 3:9].all() and not cells[10:14, 3:9].any()


def test_pose_follows_the_dot_and_the_largest_person_box_is_used(prep_inputs):
    paths = ap.find_prep_models(prep_inputs / "ckpt", need_sam2=False)
    detector, pose = ap.PersonDetector(paths["detector"]), ap.WholeBodyPose(paths["pose"])
    frames, fps = ap.read_driving_video(prep_inputs / "drive.mp4", 30)
    assert fps == 30 and len(frames) == N
    box = detector(frames[0])  # not the duplicate (NMS), not the smaller person, not the car
    np.testing.assert_allclose(box[:4], [6, 4, 121, 90], atol=1)
    metas = ap.estimate_poses(frames, detector, pose)
    for i, meta in enumerate(metas):
        nose = meta.body[0, :2] * (W, H)
        assert np.abs(nose - _dot(i)).max() < 2.0, (i, nose)
        x0, x1, y0, y1 = ap.face_box(meta)
        assert x0 < _dot(i)[0] < x1 and y0 < _dot(i)[1] < y1


def _prep(prep_inputs, out, *extra):
    return main(["animate-prep", "--video", str(prep_inputs / "drive.mp4"), "--ref", str(prep_inputs / "ref.png"),
                 "--out", str(out), "--ckpt_path", str(prep_inputs / "ckpt"), "--resolution_area", "128", "96",
                 *extra])


def _centroid(frame):
    ys, xs = np.nonzero(frame.max(-1) > 40)
    return xs.mean(), ys.mean()


def test_animation_folder_is_what_generation_reads(prep_inputs, tmp_path):
    assert _prep(prep_inputs, tmp_path / "anim") == 0
    sources = read_sources(tmp_path / "anim", replace=False, face_size=512)
    assert sources.frames == N and sources.size == (80, 128)  # the character's size by area
    assert sources.face.shape == (N, 512, 512, 3)
    pose, info = read_mp4(tmp_path / "anim" / "src_pose.mp4")
    assert info["fps"] == 30
    # the skeleton is drawn on the video's canvas and letterboxed into the character's frame (0.625x, 34 px down)
    (x0, y0), (x1, y1) = _centroid(pose[0]), _centroid(pose[-1])
    assert abs((x1 - x0) - (_dot(N - 1)[0] - _dot(0)[0]) * 0.625) < 3 and abs(y1 - y0) < 2
    assert 34 + 0.625 * _dot(0)[1] - 3 < y0 < 34 + 0.625 * 96


def test_replacement_folder_with_pose_masks(prep_inputs, tmp_path):
    assert _prep(prep_inputs, tmp_path / "rep", "--replace", "--mask_source", "pose") == 0
    sources = read_sources(tmp_path / "rep", replace=True, face_size=512)
    assert sources.frames == N and sources.size == (W, H)
    for i in range(N):
        x, y = (int(v) for v in _dot(i))
        assert sources.mask[i, y, x] > 0.5 and sources.mask[i, 5, 120] < 0.5
        assert sources.bg[i, y, x].max() < 40  # the person is blacked out of the background


def test_sam2_masks_prompt_key_frames_with_body_points(monkeypatch, tmp_path):
    """The SAM2 adapter against a stand-in of the sam2 package's video-predictor API (no torchvision here)."""
    calls = {"points": []}

    class Predictor:
        def init_state(self, video_path):
            calls["frames"] = sorted(p.name for p in __import__("pathlib").Path(video_path).iterdir())
            return {"n": len(calls["frames"])}

        def reset_state(self, state):
            calls["reset"] = True

        def add_new_points_or_box(self, inference_state, frame_idx, obj_id, points, labels):
            calls["points"].append((frame_idx, obj_id, points.copy(), labels.copy()))

        def propagate_in_video(self, state):
            for i in range(state["n"]):
                logits = torch.full((1, 1, H, W), -1.0)
                logits[..., i:i + 4, 10:20] = 1.0
                yield i, [1], logits

    build = types.ModuleType("sam2.build_sam")
    build.build_sam2_video_predictor = lambda cfg, ckpt, device: calls.update(cfg=cfg, ckpt=ckpt) or Predictor()
    monkeypatch.setitem(sys.modules, "sam2", types.ModuleType("sam2"))
    monkeypatch.setitem(sys.modules, "sam2.build_sam", build)
    frames = [np.zeros((H, W, 3), np.uint8)] * 10
    body = np.zeros((20, 3))
    body[:, 0], body[:, 1] = np.linspace(0.1, 0.9, 20), 0.5
    metas = [ap.PoseMeta(W, H, body, np.zeros((21, 3)), np.zeros((21, 3)), np.zeros((69, 3)))] * 10
    masks = ap.Sam2Masks(tmp_path / "sam2_hiera_large.pt", "cpu")(frames, metas)
    assert calls["cfg"] == "sam2_hiera_l.yaml" and len(calls["frames"]) == 10 and calls["reset"]
    assert [c[0] for c in calls["points"]] == [0, 2, 4, 6, 8]  # 10 // 4 = every 2nd frame, as the official
    pts = calls["points"][0][2]
    np.testing.assert_array_equal(pts, (body[ap.SAM_PROMPT_POINTS, :2] * (W, H)).astype(np.int32))
    assert len(masks) == 10 and masks[3].dtype == np.uint8 and masks[3][3:7, 10:20].all() and masks[3].sum() == 40


def test_skeleton_colours_and_stick_width():
    body = np.zeros((20, 3))
    body[1] = [0.25, 0.5, 1.0]  # neck
    body[2] = [0.75, 0.5, 1.0]  # right shoulder: limb (2, 3) in the first colour at 60 %
    hand = np.zeros((21, 3))
    meta = ap.PoseMeta(400, 400, body, hand, hand, np.zeros((69, 3)))
    canvas = ap.draw_skeleton(np.zeros((400, 400, 3), np.uint8), meta.skeleton())
    assert tuple(canvas[200, 150]) == (153, 0, 0)
    assert tuple(canvas[200, 100]) == (255, 85, 0)  # the neck's dot in its own colour
    assert canvas[201, 150].any() and not canvas[203, 150].any()  # 'v2' stick: 400 / 200 - 1 = 1 px half-width


def _bones(px):
    return np.array([np.hypot(*(px[i - 1, :2] - px[j - 1, :2])) for i, j in ap.LIMBS])


def test_retargeting_gives_the_performer_the_characters_bones():
    first = standing_pose(1280, 720)
    moved = standing_pose(1280, 720, shift=(0.1, 0.02))
    character = standing_pose(576, 1024, stretch=(1.3, 1.2))
    out = ap.retarget(first, character, [first, moved])
    want = _bones(character.skeleton().body)
    for skeleton in out:  # every bone but the feet (capped at half the shin) takes the character's length
        np.testing.assert_allclose(_bones(skeleton.body)[:17], want[:17], rtol=3e-3)  # int() of the scaled size
    hips_x = lambda b: (b[8, 0] + b[11, 0]) / 2  # noqa: E731
    assert hips_x(out[0].body) == pytest.approx(hips_x(character.skeleton().body), abs=1)  # where the character stands
    scale = (720 * 0.73) / (1024 * 0.73 * 1.2)  # performer / character, nose to ankles
    assert hips_x(out[1].body) - hips_x(out[0].body) == pytest.approx(0.1 * 1280 / scale)
    assert (out[0].left_hand[:, 2] > 0).all()  # hands carried along


def test_retarget_flag_draws_on_the_characters_canvas(prep_inputs, tmp_path, capsys):
    assert _prep(prep_inputs, tmp_path / "rt", "--retarget", "--use_flux") == 0
    assert "--use_flux skipped" in capsys.readouterr().out
    sources = read_sources(tmp_path / "rt", replace=False, face_size=512)
    assert sources.frames == N and sources.size == (80, 128)


@pytest.mark.parametrize("damage, extra, message", [
    ("no_det", [], "det/yolov10m.onnx is missing"),
    ("", ["--replace"], "sam2/sam2_hiera_large.pt is missing"),
    ("bad_video", [], "driving video is not a readable video"),
    ("bad_ref", [], "ref.png is not a readable image"),
    ("huge_ref", [], "px is more than the limit of 67 Mpx"),
    ("", ["--fps", "0"], "--fps 0"),
    ("", ["--retarget", "--replace", "--mask_source", "pose"], "--retarget works in animation mode only"),
])
def test_bad_prep_input_is_one_line_exit_2(prep_inputs, tmp_path, capsys, damage, extra, message):
    import shutil

    inputs = tmp_path / "in"
    shutil.copytree(prep_inputs, inputs)
    if damage == "no_det":
        (inputs / "ckpt" / "process_checkpoint" / "det" / "yolov10m.onnx").unlink()
    elif damage == "bad_video":
        (inputs / "drive.mp4").write_bytes(b"not a video")
    elif damage == "bad_ref":
        (inputs / "ref.png").write_bytes(b"not an image")
    elif damage == "huge_ref":  # refused from its header, before decoding
        write_png_header(inputs / "ref.png", 12000, 9000)
    out = tmp_path / "out"
    assert _prep(inputs, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists() or not any(out.iterdir())
