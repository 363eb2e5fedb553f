"""What every animate-prep step shares: the model files, the skeleton tables, OpenCV, the options."""
from __future__ import annotations

from dataclasses import dataclass

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
