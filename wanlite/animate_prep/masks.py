"""Replacement masks: a SAM2 video mask of the person from pose point prompts (or a box around the pose),
dilated and filled to its grid; the background and mask videos."""
from __future__ import annotations

import tempfile

from pathlib import Path

import numpy as np

from wanlite.animate_prep.common import DRAW_THRESHOLD, SAM_CHUNK, SAM_PROMPT_POINTS, PrepOptions, _cv2
from wanlite.animate_prep.pose import PoseMeta
from wanlite.errors import WanliteError


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
