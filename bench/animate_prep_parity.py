"""One-off parity of `wanlite animate-prep`'s steps against the official preprocessing code, on CPU.

Usage: python bench/animate_prep_parity.py --official PATH
PATH is a checkout of https://github.com/Wan-Video/Wan2.2; its `wan/modules/animate/preprocess` modules
(pose2d, pose2d_utils, human_visualization, utils) are imported as they are (they need onnxruntime, OpenCV and
matplotlib). The official Pose2d runs the same ONNX models as wanlite: the tiny stand-ins of
wanlite.testing.prep_models (real weights cannot be downloaded here), on frames with a moving bright figure.
Compared: keypoints and scores (133 per frame), face boxes, skeleton drawings of random poses (pixel-exact),
area resizing, frame sampling, mask dilation + grid fill, and pose retargeting (jittered standing figures of other
proportions and canvas sizes; full, three-quarter and half body, hands at the other wrist: keypoints and
drawings). Writes bench/results/animate_prep_parity.json.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import official_checkout, provenance  # noqa: E402
from harness import write_json  # noqa: E402


def _frames(n=10, h=180, w=240) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        frame = (rng.random((h, w, 3)) * 40).astype(np.uint8)  # a noisy dark scene
        cx, cy = 60 + 9 * i, 80 + 2 * i
        frame[cy - 30:cy + 40, cx - 8:cx + 8] = 200  # a bright standing figure
        frame[cy - 6:cy + 6, cx - 6:cx + 6] = 255  # and its brightest spot
        frames.append(frame)
    return frames


def _random_meta(rng, w, h):
    kp = np.concatenate([rng.random((133, 2)) * (w, h), rng.random((133, 1))], axis=1)
    return kp


def _as_official(meta) -> dict:
    return {"width": meta.width, "height": meta.height, "keypoints_body": meta.body.copy(),
            "keypoints_left_hand": meta.left_hand.copy(), "keypoints_right_hand": meta.right_hand.copy(),
            "keypoints_face": meta.face.copy()}


def retarget_parity(retarget_module, human_visualization, ap) -> dict:
    from wanlite.testing.prep_models import standing_pose

    rng = np.random.default_rng(2)
    worst_px, worst_coord = 1.0, 0.0
    legs, hips = (9, 10, 12, 13, 18, 19), (8, 11)
    cases = [((1280, 720), (576, 1024), (1.3, 1.2), (), False),  # full body
             ((832, 480), (480, 832), (0.8, 1.1), legs, False),  # three-quarter
             ((720, 1280), (720, 1280), (1.0, 0.9), legs + hips, False),  # half body
             ((1280, 720), (720, 1280), (1.1, 1.0), (), True)]  # hands found at the other wrist
    for (sw, sh), (rw, rh), stretch, hidden, crossed in cases:
        frames = [standing_pose(sw, sh, rng=rng, hidden=hidden, crossed=crossed) for _ in range(8)]
        reference = standing_pose(rw, rh, stretch, rng=rng, hidden=hidden)
        official = retarget_module.get_retarget_pose(_as_official(frames[0]), _as_official(reference),
                                                     [_as_official(m) for m in frames], None, None)
        mine = ap.retarget(frames[0], reference, frames)
        for o, m in zip(official, mine):
            worst_coord = max(worst_coord, float(np.abs(o.kps_body - m.body[:, :2]).max()))
            ref_img = human_visualization.draw_aapose_by_meta_new(np.zeros((rh, rw, 3), np.uint8), o)
            my_img = ap.draw_skeleton(np.zeros((rh, rw, 3), np.uint8), m)
            worst_px = min(worst_px, float((ref_img == my_img).all(-1).mean()))
    return {"retargeted body keypoints max abs diff (pixels)": worst_coord,
            "retargeted drawings: fraction of equal pixels (worst of 32)": worst_px}


def parity(root: Path) -> dict:
    from wanlite import animate_prep as ap
    from wanlite.testing.prep_models import write_prep_models

    sys.path.insert(0, str(root / "wan" / "modules" / "animate" / "preprocess"))
    import human_visualization
    import pose2d
    import pose2d_utils
    import retarget_pose
    import utils

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        write_prep_models(Path(folder), person=(0.1, 0.2, 0.6, 0.9))
        paths = ap.find_prep_models(Path(folder), need_sam2=False)
        frames = _frames()
        official = pose2d.Pose2d(checkpoint=str(paths["pose"]), detector_checkpoint=str(paths["detector"]),
                                 device="cpu")(frames)
        ours = ap.estimate_poses(frames, ap.PersonDetector(paths["detector"]), ap.WholeBodyPose(paths["pose"]))
    for part, attr in (("keypoints_body", "body"), ("keypoints_left_hand", "left_hand"),
                       ("keypoints_right_hand", "right_hand"), ("keypoints_face", "face")):
        diff = max(np.abs(np.asarray(o[part]) - getattr(m, attr)).max() for o, m in zip(official, ours))
        results[f"pose {part} max abs diff (normalised coords, scores)"] = float(diff)
    h, w = frames[0].shape[:2]
    same_box = [tuple(utils.get_face_bboxes(o["keypoints_face"][:, :2], scale=1.3, image_shape=(h, w)))
                == ap.face_box(m) for o, m in zip(official, ours)]
    results["face boxes equal (fraction of frames)"] = sum(same_box) / len(same_box)

    rng = np.random.default_rng(1)
    equal_pixels = []
    for size in ((720, 1280), (480, 832), (200, 300)):
        for _ in range(5):
            kp = _random_meta(rng, size[1], size[0])
            meta = pose2d_utils.load_pose_metas_from_kp2ds_seq([kp], width=size[1], height=size[0])[0]
            ref = human_visualization.draw_aapose_by_meta_new(np.zeros((*size, 3), np.uint8),
                                                              pose2d_utils.AAPoseMeta.from_humanapi_meta(meta))
            mine = ap.draw_skeleton(np.zeros((*size, 3), np.uint8), ap.pose_metas([kp], size[1], size[0])[0].skeleton())
            equal_pixels.append(float((ref == mine).all(-1).mean()))
    results["skeleton drawings: fraction of equal pixels (worst of 15)"] = min(equal_pixels)

    image = (rng.random((333, 517, 3)) * 255).astype(np.uint8)
    for area in (1280 * 720, 832 * 480, 128 * 96):
        same = np.array_equal(utils.resize_by_area(image, area, divisor=16), ap.resize_by_area(image, area))
        results[f"resize_by_area {area} px equal"] = float(same)
    results["frame sampling equal"] = float(all(
        utils.get_frame_indices(n, src, int(n / src * dst), dst) == ap.sample_indices(n, src, dst)
        for n, src, dst in ((300, 60, 30), (97, 24, 30), (151, 29.97, 30), (40, 30, 16))))
    mask = np.zeros((120, 160), np.uint8)
    mask[30:70, 50:90] = 1
    mask[80:85, 100:104] = 1
    same_masks = []
    for grid in ((1, 1), (3, 5), (10, 20)):
        _, dilated = utils.get_mask_body_img(np.zeros((120, 160, 3), np.uint8), mask.copy(), iterations=3, k=7)
        ref = utils.get_aug_mask(dilated.copy(), w_len=grid[0], h_len=grid[1])
        opts = ap.PrepOptions(grid=grid)
        _, mine = ap.replacement_layers([np.zeros((120, 160, 3), np.uint8)], [mask.copy()], opts)
        same_masks.append(np.array_equal(ref * 255, mine[0][..., 0]))
    results["replacement masks equal (3 grids)"] = float(all(same_masks))
    results.update(retarget_parity(retarget_pose, human_visualization, ap))
    return results


def main() -> int:
    root = official_checkout(__doc__)
    results = parity(root)
    for name, value in results.items():
        print(f"{name:64s} {value:.3g}")
    write_json("animate_prep_parity", {
        **provenance("animate_prep_parity.py", root),
        "models": "tiny ONNX stand-ins with the official signatures (wanlite.testing.prep_models)",
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
