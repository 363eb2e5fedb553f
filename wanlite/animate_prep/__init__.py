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

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from wanlite.animate_prep.common import LIMBS, MASK_SOURCES, MODEL_FILES, SAM_PROMPT_POINTS, PrepOptions
from wanlite.animate_prep.frames import area_size, pad_resize, read_driving_video, resize_by_area, sample_indices
from wanlite.animate_prep.masks import Sam2Masks, fill_to_grid, pose_masks, replacement_layers
from wanlite.animate_prep.pose import (PersonDetector, PoseMeta, WholeBodyPose, draw_skeleton, estimate_poses, face_box,
                                       face_crops, pose_metas)
from wanlite.animate_prep.retarget import retarget
from wanlite.errors import WanliteError

__all__ = ["animate_prep", "PrepOptions", "prep_model_paths", "find_prep_models", "read_reference", "LIMBS",
           "MASK_SOURCES", "MODEL_FILES", "SAM_PROMPT_POINTS", "area_size", "pad_resize", "read_driving_video",
           "resize_by_area", "sample_indices", "Sam2Masks", "fill_to_grid", "pose_masks", "replacement_layers",
           "PersonDetector", "PoseMeta", "WholeBodyPose", "draw_skeleton", "estimate_poses", "face_box", "face_crops",
           "pose_metas", "retarget"]


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
    """The character image as RGB, upright by its EXIF orientation; its size checked before it is decoded."""
    from PIL import ImageOps

    from wanlite.pipelines.conditioning import open_image

    img = open_image(path, "--ref (the character image)")
    try:
        with img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, ValueError):
        raise WanliteError(f"--ref (the character image) {path} is not a readable image") from None


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
