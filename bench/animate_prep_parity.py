"""One-off parity of `wanlite animate-prep`'s steps against the official preprocessing code, on CPU.

Usage: python bench/animate_prep_parity.py --official PATH
PATH is a checkout of https://github.com/Wan-Video/Wan2.2; its `wan/modules/animate/preprocess` modules
(pose2d, pose2d_utils, human_visualization, utils) are imported as they are (they need onnxruntime, OpenCV and
matplotlib). The official Pose2d runs the same ONNX models as wanlite: the tiny stand-ins of
wanlite.testing.prep_models (real weights cannot be downloaded here), on frames with a moving bright figure.
Compared: keypoints and scores (133 per frame), face boxes, skeleton drawings of random poses (pixel-exact),
area resizing, frame sampling, mask dilation + grid fill. Writes bench/results/animate_prep_parity.json.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import revision  # noqa: E402
from _record import machine, write_json  # noqa: E402


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


def parity(root: Path) -> dict:
    from wanlite.pipelines import animate_prep as ap
    from wanlite.testing.prep_models import write_prep_models

    sys.path.insert(0, str(root / "wan" / "modules" / "animate" / "preprocess"))
    import human_visualization
    import pose2d
    import pose2d_utils
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
            mine = ap.draw_skeleton(np.zeros((*size, 3), np.uint8), ap.pose_metas([kp], size[1], size[0])[0])
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
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of github.com/Wan-Video/Wan2.2")
    args = parser.parse_args()
    root = args.official.resolve()
    results = parity(root)
    for name, value in results.items():
        print(f"{name:64s} {value:.3g}")
    write_json("animate_prep_parity", {
        "command": "python bench/animate_prep_parity.py --official PATH/TO/Wan2.2",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "official": {"repository": "github.com/Wan-Video/Wan2.2", "revision": revision(root)},
        "models": "tiny ONNX stand-ins with the official signatures (wanlite.testing.prep_models)",
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
