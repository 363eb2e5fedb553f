"""Tiny ONNX stand-ins for the official Animate preprocessing models, with the same input and output signatures:
the code path of `wanlite animate-prep` is what they check, not pose quality.

- detector: [1, 3, 640, 640] -> [1, 300, 6] (x0, y0, x1, y1 in input pixels, score, class) like YOLOv10's
  end-to-end export; it reports fixed boxes (a person, an overlapping duplicate, a smaller person, a car).
- pose: [1, 3, 256, 192] -> [1, 133, 64, 48] heatmaps like ViTPose whole-body; every keypoint's heatmap peaks
  at the brightest spot of the crop, shifted by a fixed per-keypoint offset (a stick figure below the nose, the
  68 face landmarks on a ring around it), so a bright dot in a video gives a pose that follows it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

POSE_RES = (256, 192)
HEATMAP_STRIDE = 4
FACE_RING = 3  # heatmap pixels
# a stick figure around the nose, in heatmap pixels (COCO-WholeBody order): eyes, ears, shoulders, elbows, wrists,
# hips, knees, ankles
BODY_OFFSETS = {1: (-1, -1), 2: (1, -1), 3: (-2, 0), 4: (2, 0), 5: (-3, 2), 6: (3, 2), 7: (-4, 4), 8: (4, 4),
                9: (-5, 6), 10: (5, 6), 11: (-2, 6), 12: (2, 6), 13: (-2, 8), 14: (2, 8), 15: (-2, 10), 16: (2, 10)}


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_tiny_detector(path: Path, person: tuple[float, float, float, float]) -> Path:
    """`person`: the main person's box as fractions (x0, y0, x1, y1) of the frame."""
    from onnx import TensorProto, helper, numpy_helper

    rows = np.zeros((1, 300, 6), np.float32)
    box = np.array(person) * 640
    w, h = box[2] - box[0], box[3] - box[1]
    rows[0, 0] = [*box, 0.9, 0]
    rows[0, 1] = [*(box + [2, 2, 2, 2]), 0.6, 0]  # the same person again: NMS removes it
    rows[0, 2] = [box[0], box[1], box[0] + w / 3, box[1] + h / 3, 0.8, 0]  # a smaller person: not the largest
    rows[0, 3] = [560, 560, 640, 640, 0.95, 2]  # not a person (NMS is class-blind: kept clear of the person)
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["rows", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_yolov10",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 300, 6])],
        [numpy_helper.from_array(rows, "rows"), numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    return _save(graph, path)


def keypoint_offsets() -> np.ndarray:
    """[133, 2] (dx, dy) heatmap pixels from the bright spot to each keypoint."""
    offsets = np.zeros((133, 2), int)
    for k, d in BODY_OFFSETS.items():
        offsets[k] = d
    for i, k in enumerate(range(23, 91)):
        a = 2 * math.pi * i / 68
        offsets[k] = round(FACE_RING * math.cos(a)), round(FACE_RING * math.sin(a))
    return offsets


def write_tiny_pose(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    offsets = keypoint_offsets()
    r = int(np.abs(offsets).max())
    weight = np.zeros((133, 1, 2 * r + 1, 2 * r + 1), np.float32)
    for k, (dx, dy) in enumerate(offsets):
        weight[k, 0, r - dy, r - dx] = 1.0  # correlation: output peaks at spot + (dx, dy)
    h, w = POSE_RES
    nodes = [
        helper.make_node("ReduceSum", ["input", "channel_axis"], ["brightness"], keepdims=1),
        helper.make_node("AveragePool", ["brightness"], ["pooled"], kernel_shape=[HEATMAP_STRIDE] * 2,
                         strides=[HEATMAP_STRIDE] * 2),
        helper.make_node("Conv", ["pooled", "weight", "bias"], ["logits"], pads=[r] * 4),
        helper.make_node("Sigmoid", ["logits"], ["heatmaps"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_vitpose_wholebody",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT,
                                       [1, 133, h // HEATMAP_STRIDE, w // HEATMAP_STRIDE])],
        [numpy_helper.from_array(np.array([1], np.int64), "channel_axis"),
         numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(np.full(133, -2.0, np.float32), "bias")])
    return _save(graph, path)


def write_prep_models(folder: Path, person: tuple[float, float, float, float] = (0.05, 0.05, 0.95, 0.95)) -> Path:
    """`folder/process_checkpoint/{det,pose2d}/...` as the official Animate checkpoint lays them out."""
    root = Path(folder) / "process_checkpoint"
    write_tiny_detector(root / "det" / "yolov10m.onnx", person)
    write_tiny_pose(root / "pose2d" / "vitpose_h_wholebody.onnx")
    return Path(folder)


# a person standing, facing the camera, arms down (x, y as fractions of the frame; the 20-point body order)
STANDING = np.array([[0.5, 0.15], [0.5, 0.25], [0.42, 0.25], [0.38, 0.38], [0.36, 0.5], [0.58, 0.25],
                     [0.62, 0.38], [0.64, 0.5], [0.45, 0.52], [0.45, 0.7], [0.45, 0.88], [0.55, 0.52],
                     [0.55, 0.7], [0.55, 0.88], [0.48, 0.13], [0.52, 0.13], [0.46, 0.14], [0.54, 0.14],
                     [0.57, 0.92], [0.43, 0.92]])


def standing_pose(width: int, height: int, stretch=(1.0, 1.0), shift=(0.0, 0.0), rng=None, hidden=(),
                  crossed=False):
    """A PoseMeta of the standing figure: `stretch` widens (x) and lengthens (y) it about the neck, `shift`
    moves it (fractions of the frame). With `rng`: positions and scores jittered, `hidden` body points given low
    scores, hands spread and scored at random, `crossed` puts each hand at the other wrist; without: exact, all
    scores 1, each hand a short line from its wrist."""
    from wanlite.animate_prep import PoseMeta

    xy = (STANDING - STANDING[1]) * stretch + STANDING[1] + shift
    scores = np.ones(20)
    if rng is not None:
        xy = xy + rng.normal(0, 0.01, STANDING.shape)
        scores = rng.uniform(0.6, 1.0, 20)
        scores[list(hidden)] = rng.uniform(0.0, 0.3, len(hidden))
    hands = []
    for wrist in ((4, 7) if crossed else (7, 4)):  # COCO left hand at the left wrist (image right), then the right
        if rng is None:
            hands.append(np.concatenate([xy[wrist] + np.linspace(0, 0.02, 21)[:, None], np.ones((21, 1))], 1))
        else:
            pts = xy[wrist] + rng.normal(0, 0.02, (21, 2))
            hands.append(np.concatenate([pts, rng.uniform(0.2, 1.0, (21, 1))], 1))
    face = np.concatenate([np.full((69, 2), 0.5) if rng is None else rng.uniform(0.45, 0.55, (69, 2)),
                           np.ones((69, 1))], 1)
    return PoseMeta(width, height, np.concatenate([xy, scores[:, None]], 1), hands[0], hands[1], face)
