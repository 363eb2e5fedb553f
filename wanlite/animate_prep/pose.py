"""A YOLOv10 person box and a ViTPose whole-body pose per frame (onnxruntime), face crops and the OpenPose-style
skeleton drawing the model was trained on."""
from __future__ import annotations

import colorsys
import math

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wanlite.animate_prep.common import (BODY_COLORS, BODY_FROM_WHOLEBODY, DRAW_THRESHOLD, FACE_CROP, HAND_EDGES, LIMBS,
                                         _cv2)
from wanlite.errors import WanliteError


def _onnx_session(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise WanliteError('animate-prep needs onnxruntime and OpenCV: pip install "wanlite[prep]"') from None
    # CUDA when this onnxruntime build has it (onnxruntime-gpu), else the CPU
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise WanliteError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None


class PersonDetector:
    """The largest person box [x0, y0, x1, y1, score] from a YOLOv10 end-to-end ONNX model (output [1, N, 6]:
    corners in 640x640 input pixels, score, class), or None when nobody is found."""

    def __init__(self, path: Path, conf: float = 0.05, iou: float = 0.5, shape_ratio: float = 0.4):
        self.session = _onnx_session(path)
        self.input_name = self.session.get_inputs()[0].name
        self.conf, self.iou, self.shape_ratio = conf, iou, shape_ratio

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        cv2 = _cv2()
        h, w = rgb.shape[:2]
        x = cv2.resize(rgb, (640, 640)).astype(np.float64) / 255.0
        out = self.session.run(None, {self.input_name: x.transpose(2, 0, 1)[None].astype(np.float32)})[0]
        if out.ndim != 3 or out.shape[-1] != 6:
            raise WanliteError(f"the person detector returned {list(out.shape)}; a YOLOv10 end-to-end export "
                               "returns [1, N, 6] (the official det/yolov10m.onnx)")
        rows = out[0][out[0][:, 4] >= self.conf]
        boxes = rows[:, :4] * np.array([w / 640, h / 640, w / 640, h / 640])
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).astype(np.int32)
        keep = cv2.dnn.NMSBoxes(xywh.tolist(), rows[:, 4].tolist(), self.conf, self.iou)
        people = [(xywh[i], rows[i, 4]) for i in np.asarray(keep, dtype=int).reshape(-1)
                  if rows[i, 5] == 0 and rows[i, 4] > self.conf]
        if not people:
            return None
        # the largest box, skipping boxes much thinner than the widest one (the official 'max' selection)
        widest = max(max(b[2], b[3]) for b, _ in people)
        best, best_area = None, -10.0 * w * h
        for (bx, by, bw, bh), score in people:
            if bw * bh > best_area and max(bw, bh) >= widest * self.shape_ratio:
                best, best_area = np.array([bx, by, bx + bw, by + bh, score], np.float64), bw * bh
                widest = max(bw, bh)
        return best


def _crop_transform(center: np.ndarray, scale: float, res: tuple[int, int]) -> np.ndarray:
    h = 200 * scale
    w = h / (res[0] / res[1])
    return np.array([[res[1] / w, 0, res[1] * (-center[0] / w + 0.5)],
                     [0, res[0] / h, res[0] * (-center[1] / h + 0.5)],
                     [0, 0, 1]])


def _crop_corner(point, center, scale, res) -> np.ndarray:
    t = np.linalg.inv(_crop_transform(center, scale, res))
    p = t @ np.array([point[0] - 1, point[1] - 1, 1.0])
    return np.array([round(p[0]), round(p[1])], dtype=int) + 1


def crop_person(image: np.ndarray, box: np.ndarray | None, res: tuple[int, int], rescale: float = 1.25):
    """The box widened by `rescale` to the pose model's aspect, cut out (zero outside the image) and scaled to
    `res` (rows, cols); returns the float crop, its centre and its size in pixels (w, h)."""
    cv2 = _cv2()
    if box is None or box[-1] <= 0 or box[2] - box[0] < 10 or box[3] - box[1] < 10:
        box = np.array([0, 0, image.shape[1], image.shape[0]], np.float64)
    aspect = res[0] / res[1]
    center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    side = max((box[2] - box[0]) * aspect, box[3] - box[1])
    scale = np.array([side / aspect, side]) / 200.0 * rescale
    ul = _crop_corner([1, 1], center, scale.max(), res) - 1
    br = _crop_corner([res[1] + 1, res[0] + 1], center, scale.max(), res) - 1
    crop = np.zeros((br[1] - ul[1], br[0] - ul[0], image.shape[2]), np.float32)
    nx = max(0, -ul[0]), min(br[0], image.shape[1]) - ul[0]
    ny = max(0, -ul[1]), min(br[1], image.shape[0]) - ul[1]
    ox = max(0, ul[0]), min(image.shape[1], br[0])
    oy = max(0, ul[1]), min(image.shape[0], br[1])
    if nx[1] > nx[0] and ny[1] > ny[0]:
        crop[ny[0]:ny[1], nx[0]:nx[1]] = image[oy[0]:oy[1], ox[0]:ox[1]]
    return cv2.resize(crop, (res[1], res[0])), center, scale * 200


def _blur_keep_peak(heatmap: np.ndarray, kernel: int) -> np.ndarray:
    cv2 = _cv2()
    border = (kernel - 1) // 2
    peak = heatmap.max()
    padded = np.zeros((heatmap.shape[0] + 2 * border, heatmap.shape[1] + 2 * border), np.float32)
    padded[border:-border, border:-border] = heatmap
    out = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
    return out * (peak / out.max())


def _taylor_refine(log_heatmap: np.ndarray, coord: np.ndarray) -> np.ndarray:
    """Second-order (Newton) step to the log-heatmap's maximum around the integer peak (DARK)."""
    hm = log_heatmap
    H, W = hm.shape
    px, py = int(coord[0]), int(coord[1])
    if not (1 < px < W - 2 and 1 < py < H - 2):
        return coord
    dx = 0.5 * (hm[py, px + 1] - hm[py, px - 1])
    dy = 0.5 * (hm[py + 1, px] - hm[py - 1, px])
    dxx = 0.25 * (hm[py, px + 2] - 2 * hm[py, px] + hm[py, px - 2])
    dxy = 0.25 * (hm[py + 1, px + 1] - hm[py - 1, px + 1] - hm[py + 1, px - 1] + hm[py - 1, px - 1])
    dyy = 0.25 * (hm[py + 2, px] - 2 * hm[py, px] + hm[py - 2, px])
    hessian = np.array([[dxx, dxy], [dxy, dyy]])
    if dxx * dyy - dxy ** 2 != 0:
        coord = coord - np.linalg.inv(hessian) @ np.array([dx, dy])
    return coord


def decode_heatmaps(heatmaps: np.ndarray, center: np.ndarray, size: np.ndarray, kernel: int = 11) -> np.ndarray:
    """[K, h, w] heatmaps -> [K, 3] (x, y in image pixels, score): arg-max refined by DARK (Gaussian-modulated
    log-heatmap, Taylor step), mapped from the heatmap grid back through the crop."""
    K, H, W = heatmaps.shape
    flat = heatmaps.reshape(K, -1)
    idx, scores = flat.argmax(1), flat.max(1)
    coords = np.stack([idx % W, idx // W], 1).astype(np.float64)
    coords[scores <= 0] = -1
    for k in range(K):
        log_hm = np.log(np.maximum(_blur_keep_peak(heatmaps[k].astype(np.float32), kernel), 1e-10))
        coords[k] = _taylor_refine(log_hm, coords[k])
    xy = coords * (size / np.array([W, H])) + center - size * 0.5
    return np.concatenate([xy, scores[:, None]], 1)


class WholeBodyPose:
    """133 COCO-WholeBody keypoints per image from the official ViTPose-H ONNX model (input [1, 3, 256, 192])."""

    MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def __init__(self, path: Path):
        self.session = _onnx_session(path)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        dims = inp.shape[2:]
        self.res = tuple(dims) if all(isinstance(d, int) for d in dims) else (256, 192)

    def __call__(self, image: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        crop, center, size = crop_person(image, box, self.res)
        x = ((crop / 255.0 - self.MEAN) / self.STD).transpose(2, 0, 1)[None].astype(np.float32)
        heatmaps = self.session.run(None, {self.input_name: x})[0]
        if heatmaps.ndim != 4 or heatmaps.shape[1] != 133:
            raise WanliteError(f"the pose model returned {list(heatmaps.shape)}; a whole-body ViTPose returns "
                               "[1, 133, h, w] heatmaps (the official pose2d/vitpose_h_wholebody.onnx)")
        return decode_heatmaps(heatmaps[0], center, size)


@dataclass
class PoseMeta:
    """One frame's pose, coordinates normalised to the frame (x / width, y / height) with a score column."""
    width: int
    height: int
    body: np.ndarray  # [20, 3]
    left_hand: np.ndarray  # [21, 3]
    right_hand: np.ndarray  # [21, 3]
    face: np.ndarray  # [69, 3]: a foot point, then the 68 face landmarks

    def skeleton(self) -> Skeleton:
        scale = (self.width, self.height)
        return Skeleton(*(np.concatenate([part[:, :2] * scale, part[:, 2:]], 1)
                          for part in (self.body, self.left_hand, self.right_hand)))


@dataclass
class Skeleton:
    """What is drawn: body [20, 3] and hands [21, 3] as (x, y, score) in canvas pixels."""
    body: np.ndarray
    left_hand: np.ndarray
    right_hand: np.ndarray


def pose_metas(keypoints: list[np.ndarray], width: int, height: int) -> list[PoseMeta]:
    """Whole-body keypoints in pixels -> PoseMeta per frame; a frame whose body points are all off-image keeps
    the previous frame's body (the official `load_pose_metas_from_kp2ds_seq`)."""
    metas, last_body = [], None
    for kp in keypoints:
        kp = kp.astype(np.float64).copy()
        kp[:, 0] /= width
        kp[:, 1] /= height
        a, b = BODY_FROM_WHOLEBODY
        body = (kp[a] + kp[b]) / 2
        if body[:, :2].min(axis=1).max() < 0 and last_body is not None:
            body = last_body
        last_body = body
        metas.append(PoseMeta(width, height, body, kp[91:112], kp[112:133], kp[22:91]))
    return metas


def estimate_poses(frames: list[np.ndarray], detector: PersonDetector, pose: WholeBodyPose) -> list[PoseMeta]:
    """Per frame: the person box on the RGB frame, the pose on the channel-swapped frame, as the official
    `Pose2d` feeds its two models (its loader swaps RGB to BGR before the pose crop)."""
    keypoints = [pose(frame[..., ::-1], detector(frame)) for frame in frames]
    h, w = frames[0].shape[:2]
    return pose_metas(keypoints, w, h)


# face crops, skeleton drawing


def face_box(meta: PoseMeta, scale: float = 1.3) -> tuple[int, int, int, int] | None:
    """(x0, x1, y0, y1): the 68 face landmarks' box grown to `scale`x its area, three quarters of the height gain
    above (forehead and hair), clipped to the frame; None when the landmarks span no area."""
    pts = meta.face[1:, :2] * (meta.width, meta.height)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        return None
    area = w * h * scale
    dw = (math.sqrt(area * w / h) - w) / 2
    dh = (math.sqrt(area * h / w) - h) / 4
    box = (int(max(x0 - dw, 0)), int(min(x1 + dw, meta.width)), int(max(y0 - 3 * dh, 0)), int(min(y1 + dh, meta.height)))
    return box if box[1] > box[0] and box[3] > box[2] else None


def face_crops(frames: list[np.ndarray], metas: list[PoseMeta]) -> list[np.ndarray]:
    """512x512 face crops; a frame whose face was not found uses the nearest frame's box."""
    cv2 = _cv2()
    boxes = [face_box(m) for m in metas]
    found = [i for i, b in enumerate(boxes) if b is not None]
    if not found:
        raise WanliteError("no face was found in the driving video; Animate needs the performer's face visible")
    crops = []
    for i, frame in enumerate(frames):
        x0, x1, y0, y1 = boxes[min(found, key=lambda j: abs(j - i))]
        crops.append(cv2.resize(frame[y0:y1, x0:x1], (FACE_CROP, FACE_CROP)))
    return crops


def _stick_width(height: int, width: int) -> int:
    return max(int(min(height, width) / 200) - 1, 1)


def draw_skeleton(canvas: np.ndarray, skeleton: Skeleton, threshold: float = DRAW_THRESHOLD) -> np.ndarray:
    """The OpenPose-style body (limbs as ellipses at 60 % colour, joints as dots) and both hands, drawn in place
    on an RGB canvas in the official 'v2' stick widths."""
    cv2 = _cv2()
    H, W = canvas.shape[:2]
    stick = _stick_width(H, W)
    body = skeleton.body
    for (i, j), color in zip(LIMBS, BODY_COLORS):
        p, q = body[i - 1], body[j - 1]
        if p[2] < threshold or q[2] < threshold:
            continue
        length = ((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))
        center = (int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2))
        polygon = cv2.ellipse2Poly(center, (int(length / 2), stick), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for point, color in zip(body, BODY_COLORS):
        if point[2] >= threshold:
            cv2.circle(canvas, (int(point[0]), int(point[1])), stick, color, thickness=-1)
    hand_stick = max(stick // 2, 1)
    for pts in (skeleton.left_hand, skeleton.right_hand):
        for e, (i, j) in enumerate(HAND_EDGES):
            p, q = pts[i], pts[j]
            if p[2] < threshold or q[2] < threshold:
                continue
            x0, y0, x1, y1 = int(p[0]), int(p[1]), int(q[0]), int(q[1])
            if min(x0, y0, x1, y1) > 0.01:
                color = [c * 255 for c in colorsys.hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0)]
                cv2.line(canvas, (x0, y0), (x1, y1), color, thickness=hand_stick)
        for p in pts:
            if p[2] >= threshold and int(p[0]) > 0.01 and int(p[1]) > 0.01:
                cv2.circle(canvas, (int(p[0]), int(p[1])), hand_stick, (0, 0, 255), thickness=-1)
    return canvas
