"""Image conditioning for I2V-A14B (mask + image latent on channels) and TI2V-5B (clean latent frame 0).

Official sources: `wan/image2video.py` (max-area size, bicubic resize, zero frames after the first, 4-channel
mask) and `wan/textimage2video.py` / `wan/utils/utils.py:best_output_size` (32-multiple size, LANCZOS resize
and centre crop, single-frame encode).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanlite.errors import WanliteError
from wanlite.pipelines.request import MAX_IMAGE_PIXELS


def open_image(path: Path, what: str = "--image"):
    """The image at `path` opened with only its header read, its pixel count checked against the limit `--image`
    has (MAX_IMAGE_PIXELS) before anything decodes it; one clear error for a missing, unreadable or huge file.
    `what` names the file in the error ("--image", "the reference image")."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():  # a FIFO would block the open
        raise WanliteError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # PIL's own bomb limit is 89 Mpx, above ours: its warning says nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError:  # past twice PIL's limit: far past ours
        img = None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _unreadable(path, what, exc) from None
    if img is None or img.width * img.height > MAX_IMAGE_PIXELS:
        size = "far more" if img is None else f"{img.width}*{img.height} px is more"
        if img is not None:
            img.close()
        raise WanliteError(f"{what} {path}: {size} than the limit of {MAX_IMAGE_PIXELS // 10**6} Mpx; downscale it "
                           "(the video is at most 1280 px a side)")
    return img


def _unreadable(path: Path, what: str, exc: Exception) -> WanliteError:
    return WanliteError(f"{what} {path} is not a readable image ({type(exc).__name__}); use PNG, JPEG or WebP")


def load_image(path: Path, what: str = "--image"):
    """An RGB PIL image (see `open_image`: the pixel limit is checked before the pixels are decoded)."""
    img = open_image(path, what)
    try:
        with img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:  # a damaged or truncated image fails while decoding
        raise _unreadable(path, what, exc) from None


def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def max_area_size(image_wh: tuple[int, int], max_area: int, vae_stride: int, patch: int) -> tuple[int, int]:
    """I2V-A14B output (width, height): the image's aspect at about `max_area` pixels, on the latent grid."""
    iw, ih = image_wh
    aspect = ih / iw
    lat_h = round(math.sqrt(max_area * aspect) // vae_stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // vae_stride // patch * patch)
    return lat_w * vae_stride, lat_h * vae_stride


def best_output_size(image_wh: tuple[int, int], max_area: int, multiple: int = 32) -> tuple[int, int]:
    """TI2V-5B output (width, height): multiples of `multiple`, area <= max_area, aspect closest to the image."""
    iw, ih = image_wh
    ratio = iw / ih
    # round the width down first, or the height first; keep whichever aspect is closer (as a ratio)
    w1 = max(multiple, int(math.sqrt(max_area * ratio) // multiple * multiple))
    h1 = max(multiple, int(max_area / w1 // multiple * multiple))
    h2 = max(multiple, int(math.sqrt(max_area / ratio) // multiple * multiple))
    w2 = max(multiple, int(max_area / h2 // multiple * multiple))
    return min((w1, h1), (w2, h2), key=lambda wh: abs(math.log(wh[0] / wh[1] / ratio)))


def _encode(vae, video: torch.Tensor, tiling) -> torch.Tensor:
    video = video.to(next(vae.parameters()).device)
    return vae.encode(video) if tiling is None else vae.encode_tiled(video, tiling)


def i2v_condition(vae, image, size: tuple[int, int], frames: int, tiling=None) -> torch.Tensor:
    """[1, 4 + z, F_lat, h, w]: the first-frame mask (4 channels) then the VAE latent of [image, 0, 0, ...]
    (encoded in spatial tiles when `tiling` is given)."""
    w, h = size
    pixels = F.interpolate(to_tensor(image)[None], size=(h, w), mode="bicubic", align_corners=False)
    video = torch.zeros(1, 3, frames, h, w)
    video[:, :, 0] = pixels[0].clamp(-1, 1)
    latent = _encode(vae, video, tiling)
    mask = torch.zeros(1, 4, *latent.shape[2:]).to(latent)
    mask[:, :, 0] = 1.0  # the 4 pixel frames packed into latent frame 0 are all "given"
    return torch.cat([mask, latent], dim=1)


def first_frame_latent(vae, image, size: tuple[int, int], tiling=None) -> torch.Tensor:
    """[1, z, 1, h, w]: the image resized (LANCZOS) to cover `size`, centre-cropped, encoded as one frame."""
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    pixels = to_tensor(resized.crop((left, top, left + w, top + h)))
    return _encode(vae, pixels[None, :, None], tiling)
