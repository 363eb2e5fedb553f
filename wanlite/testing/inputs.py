"""Inputs the speech and animation tasks read, written for tests: a speech-like tone, a preprocessed folder."""
from __future__ import annotations

import struct
import wave
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from wanlite.pipelines.video_io import write_mp4


def write_wav(path: Path, seconds: float, rate: int = 22050) -> Path:
    """A mono 16-bit tone of `seconds` (the speech an S2V test drives with)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = (np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) * 12000).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(tone.tobytes())
    return path


def write_sources(folder: Path, frames: int = 12, size: int = 64, face: int = 32, replace: bool = False) -> Path:
    """A preprocessed Animate folder (src_pose.mp4, src_face.mp4, src_ref.png; with `replace` also src_bg.mp4 and
    src_mask.mp4), as `wanlite animate-prep` writes it, with a moving bar for the pose."""
    folder.mkdir(parents=True, exist_ok=True)
    pose = np.zeros((frames, size, size, 3), np.uint8)
    faces = np.zeros((frames, face, face, 3), np.uint8)
    for i in range(frames):
        pose[i, 20:44, 10 + 2 * i:14 + 2 * i] = 255
        faces[i, 8:24, 8:24] = (200, 150 + 4 * i, 120)
    write_mp4(pose, folder / "src_pose.mp4", fps=30)
    write_mp4(faces, folder / "src_face.mp4", fps=30)
    ref = np.zeros((80, 48, 3), np.uint8)
    ref[10:70, 10:38] = (40, 200, 90)
    Image.fromarray(ref).save(folder / "src_ref.png")
    if replace:
        write_mp4(np.full((frames, size, size, 3), 90, np.uint8), folder / "src_bg.mp4", fps=30)
        mask = np.zeros((frames, size, size, 3), np.uint8)
        mask[:, 16:48, 16:48] = 255
        write_mp4(mask, folder / "src_mask.mp4", fps=30)
    return folder


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (its pixels are never decoded, so no data is needed): a huge
    image in a few bytes, for the pixel limit."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
                     + chunk(b"IEND", b""))
    return path
