"""mp4 in and out through imageio-ffmpeg's bundled ffmpeg: H.264 yuv420p, faststart, settings as JSON metadata.

Files are written to a temporary name in the target folder and renamed only when ffmpeg reports success, so a
failed or interrupted run (a full disk, a crash) never leaves a video under the real name; the temporary files of a
run that was killed are removed by the next writer in that folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from wanlite.errors import WanliteError
from wanlite.files import clean_stale, closed, opened, temp_name

METADATA_KEY = "comment"


class OutputError(WanliteError):
    """The video could not be written (a full disk, ffmpeg failing); nothing is left under its name."""

    exit_code = 1


def unique_path(folder: Path, stem: str, suffix: str = ".mp4") -> Path:
    """`folder/stem.mp4`, or `stem_1.mp4`, `stem_2.mp4`, ... : a default name never overwrites a file."""
    candidate = Path(folder) / f"{stem}{suffix}"
    n = 1
    while candidate.exists():
        candidate = Path(folder) / f"{stem}_{n}{suffix}"
        n += 1
    return candidate


def _ffmpeg_failure(path: Path, returncode: int | None, log) -> OutputError:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    why = lines[-1].strip() if lines else f"exit code {returncode}"
    full = any(word in why.lower() for word in ("no space", "quota", "too large"))
    return OutputError(f"{path}: writing the video failed (ffmpeg: {why[:160]}); nothing was saved"
                       + ("; free disk space or pick another --save_file / --output_dir" if full else ""))


class Mp4Writer:
    """Append uint8 frames [n, H, W, 3] to an H.264 mp4 as they are produced (yuv420p, +faststart, JSON
    metadata, optionally an audio track as AAC cut to `duration` seconds); the file appears under its name only
    on `close()` or a clean context exit (temp file + rename), and only when ffmpeg exited 0 and wrote a non-empty
    file; otherwise `OutputError` and the temp file is gone. `abort()` removes it."""

    def __init__(self, path: Path, size: tuple[int, int], fps: int, metadata: dict | None = None,
                 audio: Path | None = None, crf: int = 18, duration: float | None = None):
        import imageio_ffmpeg

        w, h = size
        if h % 2 or w % 2:
            raise ValueError(f"yuv420p needs an even width and height, got {w}x{h}")
        self.path, self.size = Path(path), (w, h)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.path.parent)  # what a killed run left here
        self.tmp = temp_name(self.path)
        # what imageio-ffmpeg's write_frames runs, but as our own process: its exit code is the only sign of a
        # failed write (a full disk), and write_frames never reports it
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-nostdin", "-f", "rawvideo",
               "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(Fraction(fps).limit_denominator()), "-i", "-"]
        cmd += ["-an"] if audio is None else ["-i", str(audio), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-movflags", "+faststart"]
        if duration is not None:  # the audio may outlast the frames: cut the output at the video's length
            cmd += ["-t", f"{duration:.6f}"]
        if metadata is not None:
            cmd += ["-metadata", f"{METADATA_KEY}={json.dumps(metadata, ensure_ascii=False, separators=(',', ':'))}"]
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: ffmpeg never blocks on a full stderr
        opened(self.tmp)
        self.process = subprocess.Popen([*cmd, str(self.tmp)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=self.log)
        self.frames = 0
        self.closed = False

    def append(self, frames: np.ndarray) -> None:
        frames = np.ascontiguousarray(frames)
        w, h = self.size
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (h, w, 3):
            raise ValueError(f"frames must be uint8 [n, {h}, {w}, 3], got {frames.dtype} {frames.shape}")
        try:
            self.process.stdin.write(memoryview(frames).cast("B"))
        except OSError:  # ffmpeg quit (a full disk, a bad audio file): its own message says why
            self.process.kill()
            self.process.wait()
            failure = _ffmpeg_failure(self.path, self.process.returncode, self.log)
            self.abort()
            raise failure from None
        self.frames += len(frames)

    def __enter__(self) -> Mp4Writer:
        return self

    def close(self) -> None:
        """Finish the file; it appears under its name only when ffmpeg succeeded."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        code = self.process.wait()
        try:
            if code != 0:
                raise _ffmpeg_failure(self.path, code, self.log)
            if self.frames == 0 or not self.tmp.is_file() or self.tmp.stat().st_size == 0:
                raise OutputError(f"{self.path}: ffmpeg wrote no video ({self.frames} frames given); nothing was saved")
            with open(self.tmp, "r+b") as f:
                os.fsync(f.fileno())  # a delayed write error (full disk, quota) surfaces here, not after the rename
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self.log.close()
        closed(self.tmp)

    def abort(self) -> None:
        self.closed = True
        try:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
        finally:
            self.tmp.unlink(missing_ok=True)
            self.log.close()
            closed(self.tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(frames: np.ndarray, path: Path, fps: int, metadata: dict | None = None,
              audio: Path | None = None, crf: int = 18) -> Path:
    """frames: uint8 [F, H, W, 3] (even H and W). Writes H.264 yuv420p with +faststart and JSON metadata."""
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    with Mp4Writer(path, (frames.shape[2], frames.shape[1]), fps, metadata, audio, crf) as writer:
        writer.append(frames)
    return Path(path)


def _unescape_ffmetadata(value: str) -> str:
    out, escaped = [], False
    for ch in value:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def read_mp4_metadata(path: Path) -> dict | None:
    """The settings JSON a wanlite mp4 carries, or None when the file has none."""
    import imageio_ffmpeg

    run = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace")
    if run.returncode != 0:
        raise ValueError(f"{path}: ffmpeg cannot read it ({run.stderr.strip().splitlines()[-1:] or ['?']})")
    for line in run.stdout.splitlines():
        if line.startswith(METADATA_KEY + "="):
            try:
                return json.loads(_unescape_ffmetadata(line[len(METADATA_KEY) + 1:]))
            except json.JSONDecodeError:
                return None
    return None


def read_mp4(path: Path) -> tuple[np.ndarray, dict]:
    """Decode every frame: uint8 [F, H, W, 3] and ffmpeg's stream info (fps, size, ...)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    info = next(reader)
    w, h = info["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames), info


def contact_sheet(frames: np.ndarray, path: Path, columns: int = 4, max_frames: int = 16) -> Path:
    """A PNG grid of evenly spaced frames, for a quick look without a video player."""
    from PIL import Image

    idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    picked = frames[idx]
    rows = -(-len(picked) // columns)
    cols = min(columns, len(picked))
    h, w = picked.shape[1:3]
    sheet = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, frame in enumerate(picked):
        r, c = divmod(i, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = frame
    path = Path(path)
    tmp = temp_name(path)
    try:
        Image.fromarray(sheet).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: writing the preview failed ({exc.strerror or exc}); nothing was saved") from None
    return path


def video_frames(path: Path, what: str) -> tuple[float, Iterator[np.ndarray]]:
    """A user's video as its frame rate and a stream of uint8 [H, W, 3] frames; an unreadable file (at the
    start or mid-stream) is one WanliteError naming `what` it was meant to be."""
    import imageio_ffmpeg

    from wanlite.errors import WanliteError

    def unreadable(exc: Exception) -> WanliteError:
        return WanliteError(f"{path}: the {what} is not a readable video ({type(exc).__name__})")

    errors = (OSError, RuntimeError, StopIteration, KeyError, ValueError)
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        info = next(reader)
        w, h = info["size"]
    except errors as exc:
        raise unreadable(exc) from None

    def stream() -> Iterator[np.ndarray]:
        try:
            for buf in reader:
                yield np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3)
        except errors as exc:
            raise unreadable(exc) from None
        finally:
            reader.close()  # ends ffmpeg when the caller stops early

    return float(info.get("fps") or 30), stream()


def read_video(path: Path, what: str) -> tuple[np.ndarray, float]:
    """Every frame of a user's video, uint8 [F, H, W, 3], and its frame rate (see `video_frames`)."""
    from wanlite.errors import WanliteError

    fps, stream = video_frames(path, what)
    frames = list(stream)
    if not frames:
        raise WanliteError(f"{path}: the {what} has no frames")
    return np.stack(frames), fps
