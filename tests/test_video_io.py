import numpy as np
import pytest

from wanlite.pipelines.progress import step_line
from wanlite.pipelines.video_io import contact_sheet, read_mp4, read_mp4_metadata, unique_path, write_mp4


def test_mp4_roundtrip_with_metadata(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (5, 1, 1, 3), dtype=np.uint8), 32, axis=1).repeat(48, axis=2)
    meta = {"prompt": 'a "red" = square; #1 \\ 中文', "seed": 7, "guide_scale": [3.0, 4.0]}
    path = write_mp4(frames, tmp_path / "v.mp4", fps=16, metadata=meta)
    assert read_mp4_metadata(path) == meta
    decoded, info = read_mp4(path)
    assert decoded.shape == (5, 32, 48, 3) and info["fps"] == 16 and tuple(info["size"]) == (48, 32)
    psnr = 10 * np.log10(255**2 / np.mean((decoded.astype(float) - frames) ** 2))
    assert psnr > 35  # flat-colour frames survive H.264 at crf 18
    assert not list(tmp_path.glob(".*partial*"))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(np.zeros((2, 31, 32, 3), np.uint8), tmp_path / "odd.mp4", fps=16)
    assert list(tmp_path.iterdir()) == []


def test_unique_path_never_overwrites(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "a_1.mp4").write_bytes(b"x")
    assert unique_path(tmp_path, "a") == tmp_path / "a_2.mp4"


def test_contact_sheet(tmp_path):
    from PIL import Image

    frames = np.zeros((9, 16, 16, 3), np.uint8)
    frames[4] = 255
    path = contact_sheet(frames, tmp_path / "s.png", columns=4)
    img = np.asarray(Image.open(path))
    assert img.shape == (48, 64, 3)  # 9 frames -> 3 rows of 4 columns
    assert img[16:32, 0:16].min() == 255  # frame 4 sits at row 1, column 0


def test_plain_progress_line():
    line = step_line({"i": 12, "total": 40, "role": "high_noise", "role_i": 12, "role_total": 26, "elapsed": 24.0},
                     rate=2.0, eta=56.0)
    assert line == "step 12/40  high noise 12/26  2.00 s/step  ETA 0:56"
    clip = step_line({"i": 3, "total": 20, "role": "main", "role_i": 3, "role_total": 20, "unit": "clip", "part": 2,
                      "parts": 4}, rate=1.5, eta=3725)
    assert clip == "clip 2/4 step 3/20  denoise 3/20  1.50 s/step  ETA 1:02:05"
