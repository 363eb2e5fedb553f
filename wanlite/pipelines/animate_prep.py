"""`wanlite animate-prep`: a driving video and a character image -> the folder Animate-14B generates from
(`src_pose.mp4`, `src_face.mp4`, `src_ref.png`; with `--replace` also `src_bg.mp4`, `src_mask.mp4`).

The steps and numbers follow the official `wan/modules/animate/preprocess` (spec §10.5), so the model sees the
skeleton style and face crops it was trained on: a YOLOv10 person box and a ViTPose whole-body pose (133 points,
DARK-decoded heatmaps) per frame through onnxruntime, face crops of 1.3x the face's area scaled to 512x512, the
OpenPose-style skeleton with hands drawn by OpenCV, and for replacement a SAM2 video mask of the person (point
prompts from the pose on 4 key frames per 400), dilated and filled to its box. The skeleton is drawn on the source
frames' canvas, or with `retarget` re-proportioned to the character (official `--retarget_flag`; its optional
FLUX.1-Kontext pose edits are not run).

onnxruntime and OpenCV are imported only here (`pip install "wanlite[prep]"`); SAM2 only for `--replace`.
"""
from __future__ import annotations

import colorsys
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wanlite.errors import WanliteError

MODEL_FILES = {"detector": "det/yolov10m.onnx", "pose": "pose2d/vitpose_h_wholebody.onnx",
               "sam2": "sam2/sam2_hiera_large.pt"}
FACE_CROP = 512
MASK_SOURCES = ("sam2", "pose")
# COCO-WholeBody (133 points) -> the 20-point body the skeleton is drawn from: each is the mean of two points
# (the neck is the mean of both shoulders, the toes of two foot points)
BODY_FROM_WHOLEBODY = ([0, 6, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 20],
                       [0, 5, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 18, 21])
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (14, 19), (11, 20)]  # 1-based, into the 20-point body
BODY_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (200, 200, 0), (100, 100, 0)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
SAM_PROMPT_POINTS = [0, 1, 2, 5, 8, 11, 10, 13]  # nose, neck, shoulders, hips, knees of the 20-point body
SAM_CHUNK = 400
DRAW_THRESHOLD = 0.5


def _cv2():
    try:
        import cv2
    except ImportError:
        raise WanliteError('animate-prep needs OpenCV and onnxruntime: pip install "wanlite[prep]"') from None
    return cv2


@dataclass(frozen=True)
class PrepOptions:
    replace: bool = False
    area: tuple[int, int] = (1280, 720)  # frames/reference are scaled to this many pixels, aspect kept
    fps: float = 30  # -1: the source video's rate
    dilate_iterations: int = 3
    dilate_kernel: int = 7
    grid: tuple[int, int] = (1, 1)  # (w_len, h_len): mask filled per cell of this grid over its box
    mask_source: str = "sam2"
    retarget: bool = False  # animation mode: the skeleton re-proportioned to the character


# ---- sizes and frame sampling --------------------------------------------------------------------------------


def area_size(width: int, height: int, area: int, divisor: int = 16) -> tuple[int, int]:
    """(w, h) with the source's aspect and about `area` pixels, each a multiple of `divisor` (rounded down). The
    official `resize_by_area` always lands here: its search for a better size fails on a signature mismatch."""
    new_h = math.sqrt(area / (width / height))
    new_w = area / new_h
    w, h = int(new_w // divisor) * divisor, int(new_h // divisor) * divisor
    if w <= 0 or h <= 0:
        raise WanliteError(f"--resolution_area {area} pixels is too small for a {width}x{height} video")
    return w, h


def pad_resize(image: np.ndarray, height: int, width: int, interpolation=None) -> np.ndarray:
    """Scaled to fit (height, width) with its aspect kept, centred on black (official `padding_resize`)."""
    cv2 = _cv2()
    interpolation = cv2.INTER_LINEAR if interpolation is None else interpolation
    h0, w0 = image.shape[:2]
    out = np.zeros((height, width, image.shape[2]), np.uint8)
    if h0 / w0 > height / width:
        new_w = int(height / h0 * w0)
        pad = int((width - new_w) / 2)
        out[:, pad:pad + new_w] = cv2.resize(image, (new_w, height), interpolation=interpolation).reshape(height, new_w, -1)
    else:
        new_h = int(width / w0 * h0)
        pad = int((height - new_h) / 2)
        out[pad:pad + new_h] = cv2.resize(image, (width, new_h), interpolation=interpolation).reshape(new_h, width, -1)
    return out


def resize_by_area(image: np.ndarray, area: int) -> np.ndarray:
    cv2 = _cv2()
    h, w = image.shape[:2]
    new_w, new_h = area_size(w, h, area)
    shrink = new_w * new_h < w * h
    return pad_resize(image, new_h, new_w, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def sample_indices(frame_count: int, video_fps: float, fps: float) -> list[int]:
    """Source frames nearest to a `fps` timeline over the video's duration (official `get_frame_indices`)."""
    target = int(frame_count / video_fps * fps)
    times = np.arange(target) / fps
    return np.clip(np.round(times * video_fps).astype(int), 0, frame_count - 1).tolist()


def read_driving_video(path: Path, fps: float) -> tuple[list[np.ndarray], float]:
    """The frames at `fps` (-1: the source rate) as RGB uint8 arrays, and that rate. Decoded as a stream that
    keeps only the frames `sample_indices` picks (a long 60 fps source never sits in memory whole); the count
    is known at the end, when the list is cut (or padded with the last frame) to it."""
    from wanlite.pipelines.video_io import video_frames

    video_fps, stream = video_frames(Path(path), "driving video")
    fps = video_fps if fps == -1 else fps
    kept, count = [], 0
    for frame in stream:
        # frame `count` is wanted once for every output time that rounds to it
        while round(len(kept) / fps * video_fps) == count:
            kept.append(frame)
        count += 1
    target = len(sample_indices(count, video_fps, fps)) if count else 0
    if target == 0:
        raise WanliteError(f"{path}: {count} frames at {video_fps:g} fps give no frame at {fps:g} fps")
    return (kept + kept[-1:] * target)[:target], fps


# ---- person box (YOLOv10) and whole-body pose (ViTPose) --------------------------------------------------------


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


# ---- face crops, skeleton drawing -----------------------------------------------------------------------------


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


# ---- pose retargeting ----------------------------------------------------------------------------------------

RETARGET_THRESHOLD = 0.4
# bones whose two sides get the larger of their two length ratios: shoulders, upper arms, forearms, neck-hips,
# thighs, shins, feet (indices into LIMBS)
PAIRED_BONES = [(0, 1), (2, 4), (3, 5), (6, 9), (7, 10), (8, 11), (17, 18)]


def _limb_geometry(px: np.ndarray) -> tuple[list[float], list[float]]:
    lengths, angles = [], []
    for i, j in LIMBS:
        p, q = px[i - 1], px[j - 1]
        lengths.append(((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2) ** 0.5)
        angles.append(math.degrees(math.atan2(p[1] - q[1], p[0] - q[0])))
    return lengths, angles


def _regrow(px: np.ndarray, lengths, angles) -> np.ndarray:
    """The skeleton rebuilt outward from the neck: each bone keeps its direction and takes its new length."""
    out = px[:, :2].astype(np.float64).copy()
    for (i, j), length, angle in zip(LIMBS, lengths, angles):
        out[j - 1] = (out[i - 1][0] - length * math.cos(math.radians(angle)),
                      out[i - 1][1] - length * math.sin(math.radians(angle)))
    return out


def _nose_to(meta: PoseMeta, lower: tuple[int, int]) -> float:
    return meta.height * abs((meta.body[lower[0], 1] + meta.body[lower[1], 1]) / 2 - meta.body[0, 1])


def _framing(body: np.ndarray, threshold: float) -> int:
    """2: ankles and hips in frame, 1: hips, 0: neither (the official full / three-quarter / half body)."""
    def visible(idx):
        return all(body[k, 1] <= 1 and body[k, 2] >= threshold for k in idx)
    return 2 if visible((10, 13, 8, 11)) else 1 if visible((8, 11)) else 0


def retarget(first: PoseMeta, reference: PoseMeta, metas: list[PoseMeta],
             threshold: float = RETARGET_THRESHOLD) -> list[Skeleton]:
    """The driving poses re-proportioned to the character (official `get_retarget_pose` without FLUX edits):
    every bone scaled by (character's bone / performer's bone in the first frame, both sides alike), the
    figure scaled by the nose-to-ankle (else nose-to-hip) height ratio, anchored at the feet (or the neck)
    where the character stands, hands scaled and carried to the new wrists; drawn on the character's canvas."""
    for lower in ((10, 13), (8, 11)):  # the performer / character height ratio: nose to ankles, else to hips
        if all((m.body[[0, *lower], 2] > 0.5).all() for m in (first, reference)):
            scale = _nose_to(first, lower) / _nose_to(reference, lower)
            break
    else:
        scale = math.sqrt(first.height * first.width) / math.sqrt(reference.height * reference.width)
    dst_w, dst_h = int(reference.width * scale), int(reference.height * scale)
    framing = min(_framing(reference.body, threshold), _framing(first.body, threshold))

    src_len, _ = _limb_geometry(first.body[:, :2] * (first.width, first.height))
    dst_len, _ = _limb_geometry(reference.body[:, :2] * (dst_w, dst_h))
    ratios = [d / s if s > 0 else None for s, d in zip(src_len, dst_len)]
    shoulders = (ratios[0] + ratios[1]) / 2 if ratios[0] is not None and ratios[1] is not None else 1.0
    ratios = [shoulders if r is None else r for r in ratios]  # a zero-length bone: the shoulders' ratio
    for a, b in PAIRED_BONES:
        ratios[a] = ratios[b] = max(ratios[a], ratios[b])
    for a, b in ((13, 15), (14, 16)):  # nose-eye and eye-ear bones: the mean of both sides
        ratios[a] = ratios[b] = (ratios[a] + ratios[b]) / 2

    first_px = first.body[:, :2] * (first.width, first.height)
    lengths, angles = _limb_geometry(first_px)
    rescaled_first = _regrow(first_px, [x * r for x, r in zip(lengths, ratios)], angles)
    if framing == 2:
        feet = [(reference.body[10, 1] + reference.body[19, 1]) / 2, (reference.body[13, 1] + reference.body[18, 1]) / 2]
        anchor_x = (rescaled_first[8, 0] + rescaled_first[11, 0]) / 2
        delta = np.array([anchor_x - (reference.body[8, 0] + reference.body[11, 0]) * dst_w / 2,
                          max(rescaled_first[10, 1], rescaled_first[13, 1]) - max(feet) * dst_h])
    else:
        anchor_x = rescaled_first[1, 0]
        delta = rescaled_first[1] - reference.body[1, :2] * (dst_w, dst_h)

    hand_ratio = max(ratios[0], ratios[1]) / scale
    skeletons = []
    for n, meta in enumerate(metas):
        size = np.array([meta.width, meta.height], np.float64)
        px = meta.body[:, :2] * size
        lengths, angles = _limb_geometry(px)
        new_len = [x * r for x, r in zip(lengths, ratios)]
        new_len[18] = min(new_len[18], new_len[8] * 0.5)  # feet at most half the shin
        new_len[17] = min(new_len[17], new_len[11] * 0.5)
        body = _regrow(px, new_len, angles)
        shift = delta.copy()
        if n == 0 and framing != 1:  # the official re-anchors the first frame on its own hips (neck)
            shift[0] += ((body[8, 0] + body[11, 0]) / 2 if framing == 2 else body[1, 0]) - anchor_x
        body = (body - shift) / scale

        # the official pairs the right wrist (body 4) with the COCO right hand, then swaps the two hands when
        # that hand's root is nearer the other wrist
        near, far = (_scale_hand(h, size, hand_ratio, threshold) for h in (meta.right_hand, meta.left_hand))
        d4, d7 = body[4] - px[4], body[7] - px[7]  # where the wrists moved
        if near[0, 0] != -1:
            d4 += px[4] - near[0, :2] * size
        if far[0, 0] != -1:
            d7 += px[7] - far[0, :2] * size
        root = near[0, :2] * size
        if np.hypot(*(px[4] - root)) > np.hypot(*(px[7] - root)):
            hands = _place_hand(far, d4, size), _place_hand(near, d7, size)
        else:
            hands = _place_hand(near, d4, size), _place_hand(far, d7, size)
        ref_size = np.array([reference.width, reference.height], np.float64)
        body_px = body / ref_size * ref_size  # normalised and back, as the official stores it
        skeletons.append(Skeleton(np.concatenate([body_px, meta.body[:, 2:]], 1), *hands))
    return skeletons


def _scale_hand(hand: np.ndarray, size: np.ndarray, ratio: float, threshold: float) -> np.ndarray:
    """Scaled about its root in normalised coordinates; unconfident points become (-1, -1, 0)."""
    xy = hand[:, :2] * size / size  # the official's pixel round trip
    out = np.concatenate([xy * ratio - xy[0] * (ratio - 1), hand[:, 2:]], 1)
    out[hand[:, 2] < threshold] = (-1, -1, 0)
    return out


def _place_hand(hand: np.ndarray, delta: np.ndarray, size: np.ndarray) -> np.ndarray:
    out = np.zeros_like(hand)
    for k, (x, y, score) in enumerate(hand):
        if score != 0:
            out[k] = (int(x * size[0] + delta[0]), int(y * size[1] + delta[1]), score)
    return out


# ---- replacement masks -----------------------------------------------------------------------------------------


def _key_frames(count: int) -> list[int]:
    keys = 4 if count > 4 else 1
    return list(range(0, count, count // keys))


class Sam2Masks:
    """Per-frame person masks from SAM2 (the `sam2` package, official `sam2_hiera_large.pt`): the video is cut
    into chunks of 400 frames, each prompted with the body's nose, neck, shoulders, hips and knees on 4 key
    frames and propagated (the official `get_mask`)."""

    def __init__(self, checkpoint: Path, device: str):
        try:
            from sam2.build_sam import build_sam2_video_predictor
        except ImportError:
            raise WanliteError("--replace masks need the sam2 package (pip install sam2; it needs torchvision); "
                               "or use --mask_source pose (a box from the pose, no extra model)") from None
        self.predictor = build_sam2_video_predictor("sam2_hiera_l.yaml", str(checkpoint), device=device)

    def __call__(self, frames: list[np.ndarray], metas: list[PoseMeta]) -> list[np.ndarray]:
        from PIL import Image

        masks = []
        for start in range(0, len(frames), SAM_CHUNK):
            chunk, chunk_metas = frames[start:start + SAM_CHUNK], metas[start:start + SAM_CHUNK]
            with tempfile.TemporaryDirectory(prefix="wanlite-sam2-") as folder:
                for i, frame in enumerate(chunk):  # sam2 reads a folder of "<index>.jpg"
                    Image.fromarray(frame).save(Path(folder) / f"{i}.jpg", quality=95)
                state = self.predictor.init_state(video_path=folder)
                self.predictor.reset_state(state)
                for k in _key_frames(len(chunk)):
                    m = chunk_metas[k]
                    points = (m.body[SAM_PROMPT_POINTS, :2] * (m.width, m.height)).astype(np.int32)
                    self.predictor.add_new_points_or_box(inference_state=state, frame_idx=k, obj_id=1,
                                                         points=points, labels=np.ones(len(points), np.int32))
                by_frame = {}
                for idx, _obj_ids, logits in self.predictor.propagate_in_video(state):
                    by_frame[idx] = (logits[0] > 0.0).cpu().numpy()[0].astype(np.uint8)
            masks += [by_frame[i] for i in range(len(chunk))]
        return masks


def pose_masks(frames: list[np.ndarray], metas: list[PoseMeta], threshold: float = DRAW_THRESHOLD) -> list[np.ndarray]:
    """Masks without a segmentation model: the convex hull of the confident keypoints grown by a tenth of the
    body's height on each side (keypoints sit inside the silhouette: hair, clothes and limbs' width lie outside)."""
    cv2 = _cv2()
    masks = []
    for frame, m in zip(frames, metas):
        pts = np.concatenate([m.body, m.left_hand, m.right_hand, m.face])
        pts = pts[pts[:, 2] >= threshold, :2] * (m.width, m.height)
        mask = np.zeros(frame.shape[:2], np.uint8)
        if len(pts) >= 3:
            hull = cv2.convexHull(pts.astype(np.int32))
            cv2.fillConvexPoly(mask, hull, 1)
            grow = max(int(np.ptp(pts[:, 1]) * 0.1), 1)
            mask = cv2.dilate(mask, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
        masks.append(mask)
    return masks


def fill_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Every cell of a (w_len x h_len) grid over the mask's box that the mask touches, filled (official
    `get_aug_mask`: with the default 1x1 grid, the mask becomes its bounding box, less its last row/column)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    step_w, step_h = max(int((x1 - x0) / grid[0]), 1), max(int((y1 - y0) / grid[1]), 1)
    out = mask.copy()
    for cx in range(x0, x1, step_w):
        for cy in range(y0, y1, step_h):
            cell = (slice(cy, min(cy + step_h, y1)), slice(cx, min(cx + step_w, x1)))
            if mask[cell].any():
                out[cell] = 1
    return out


def replacement_layers(frames: list[np.ndarray], masks: list[np.ndarray], options: PrepOptions):
    """(backgrounds with the person blacked out, 0/255 mask frames) after dilating and grid-filling each mask."""
    cv2 = _cv2()
    backgrounds, mask_frames = [], []
    kernel = np.ones((options.dilate_kernel, options.dilate_kernel), np.uint8)
    for frame, mask in zip(frames, masks):
        if options.dilate_iterations > 0:
            mask = fill_to_grid(cv2.dilate(mask, kernel, iterations=options.dilate_iterations), options.grid)
        backgrounds.append(frame * (1 - mask[:, :, None]))
        mask_frames.append(np.repeat(mask[:, :, None] * 255, 3, axis=2).astype(np.uint8))
    return backgrounds, mask_frames


# ---- the command ---------------------------------------------------------------------------------------------


def prep_model_paths(folder: Path) -> dict[str, Path]:
    """Where the official `process_checkpoint/` files are expected under `folder` (the Animate checkpoint
    folder or that sub-folder itself)."""
    folder = Path(folder)
    if (folder / "process_checkpoint").is_dir():
        folder = folder / "process_checkpoint"
    return {name: folder / rel for name, rel in MODEL_FILES.items()}


def find_prep_models(folder: Path, need_sam2: bool) -> dict[str, Path]:
    """The preprocessing models a run needs; a missing one fails naming the file."""
    paths = prep_model_paths(folder)
    if not need_sam2:
        del paths["sam2"]
    for name, path in paths.items():
        if not path.is_file():
            hint = " (or use --mask_source pose: no SAM2 needed)" if name == "sam2" else ""
            raise WanliteError(f"{path} is missing: animate-prep needs the official Wan2.2-Animate-14B "
                               f"process_checkpoint/{MODEL_FILES[name]}{hint}")
    return paths


def read_reference(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, UnidentifiedImageError):
        raise WanliteError(f"{path}: the character image is not a readable image") from None


def animate_prep(video: Path, ref: Path, out: Path, models: Path, options: PrepOptions, device: str = "cpu",
                 log=print) -> list[Path]:
    """Writes the Animate input folder `out` and returns the files written. Everything is computed first and
    written into a hidden folder, then moved in: a failed run leaves no partial set behind."""
    from PIL import Image

    from wanlite.pipelines.video_io import Mp4Writer

    for path, flag in ((video, "--video"), (ref, "--ref")):
        if not Path(path).is_file():
            raise WanliteError(f"{flag} {path} does not exist")
    if options.mask_source not in MASK_SOURCES:
        raise WanliteError(f"--mask_source {options.mask_source}: choose one of {', '.join(MASK_SOURCES)}")
    if options.fps != -1 and options.fps <= 0:
        raise WanliteError(f"--fps {options.fps:g}: give a positive rate, or -1 for the video's own")
    if min(options.grid) < 1 or options.dilate_kernel < 1 or options.dilate_iterations < 0:
        raise WanliteError("--w_len/--h_len and --k must be at least 1, --iterations at least 0")
    if options.retarget and options.replace:
        raise WanliteError("--retarget works in animation mode only: replacement keeps the performer's "
                           "proportions (they interact with the scene); drop one of the two")
    paths = find_prep_models(models, options.replace and options.mask_source == "sam2")
    area = options.area[0] * options.area[1]
    reference = read_reference(Path(ref))
    frames, fps = read_driving_video(Path(video), options.fps)
    log(f"driving video: {len(frames)} frames at {fps:g} fps")
    detector, pose = PersonDetector(paths["detector"]), WholeBodyPose(paths["pose"])

    videos: dict[str, list[np.ndarray]] = {}
    if options.replace:
        frames = [resize_by_area(f, area) for f in frames]
        log(f"pose: {len(frames)} frames at {frames[0].shape[1]}x{frames[0].shape[0]}")
        metas = estimate_poses(frames, detector, pose)
        videos["src_face.mp4"] = face_crops(frames, metas)
        videos["src_pose.mp4"] = [draw_skeleton(np.zeros_like(f), m.skeleton()) for f, m in zip(frames, metas)]
        log(f"masks: {options.mask_source}")
        segment = Sam2Masks(paths["sam2"], device) if options.mask_source == "sam2" else pose_masks
        videos["src_bg.mp4"], videos["src_mask.mp4"] = replacement_layers(frames, segment(frames, metas), options)
    else:
        character = resize_by_area(reference, area)
        ref_h, ref_w = character.shape[:2]
        log(f"pose: {len(frames)} frames, drawn at the character's {ref_w}x{ref_h}"
            + (", retargeted to the character's proportions" if options.retarget else ""))
        metas = estimate_poses(frames, detector, pose)
        videos["src_face.mp4"] = face_crops(frames, metas)
        if options.retarget:
            skeletons = retarget(metas[0], estimate_poses([character], detector, pose)[0], metas)
            videos["src_pose.mp4"] = [draw_skeleton(np.zeros_like(character), s) for s in skeletons]
        else:
            videos["src_pose.mp4"] = [pad_resize(draw_skeleton(np.zeros_like(f), m.skeleton()), ref_h, ref_w)
                                      for f, m in zip(frames, metas)]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".animate-prep-", dir=out))
    try:
        Image.fromarray(reference).save(staging / "src_ref.png")
        for name, clip in videos.items():
            h, w = clip[0].shape[:2]
            with Mp4Writer(staging / name, (w, h), fps) as writer:
                writer.append(np.stack(clip))
        written = []
        for name in ["src_ref.png", *videos]:
            os.replace(staging / name, out / name)
            written.append(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
