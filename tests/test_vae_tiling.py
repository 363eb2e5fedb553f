"""Tiled VAE decode/encode: tiles cover the frame exactly, a single tile is the plain decode, and on the bundled
tiny models' trained VAEs tiled output matches untiled to a stated PSNR."""
import numpy as np
import pytest
import torch

from wanlite.loading.checkpoints import discover
from wanlite.loading.models import load_vae
from wanlite.models.vae import Tiling, WanVAE
from wanlite.specs import TINY_VAE_SPECS
from wanlite.tiny import checkpoint_dir
from wanlite.tiny.data import render, to_model_video
from wanlite.tiny.train import RECIPES


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / (a - b).pow(2).mean()))  # video in [-1, 1]: peak-to-peak 2


@pytest.mark.parametrize("length,tile,overlap", [(5, 8, 2), (16, 8, 4), (17, 6, 3), (40, 32, 8), (9, 4, 0)])
def test_spans_cover_the_axis_with_the_stated_overlap(length, tile, overlap):
    spans = Tiling(tile, overlap).spans(length)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(b - a == min(tile, length) for a, b in spans)
    assert all(nxt[0] <= cur[1] - overlap and nxt[0] > cur[0] for cur, nxt in zip(spans, spans[1:]))


@pytest.mark.parametrize("tile,overlap", [(1, 0), (8, 8), (8, -1)])
def test_bad_tiling_is_refused(tile, overlap):
    with pytest.raises(ValueError, match="Tiling"):
        Tiling(tile, overlap)


@pytest.mark.parametrize("name", ["vae2.1", "vae2.2"])
def test_one_tile_is_the_plain_decode(name):
    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE_SPECS[name]).eval()
    z = torch.randn(1, vae.spec.z_dim, 2, 4, 6)
    with torch.no_grad():
        assert torch.equal(vae.decode_tiled(z, Tiling(8, 2)), vae.decode(z))


def mosaic(task: str) -> torch.Tensor:
    """2x2 different clips drawn like the model's training clips, side by side: a frame twice the model's size,
    with content in every tile."""
    recipe = RECIPES[task]
    size, speed = recipe.size, recipe.speed
    rng = np.random.default_rng(5)
    clips = [to_model_video(render(recipe.random_clip(rng, 5), size, 5, speed, recipe.trail)) for _ in range(4)]
    return torch.cat([torch.cat(clips[:2], -1), torch.cat(clips[2:], -1)], -2)[None]


@pytest.mark.parametrize("task,tiling,floor", [
    ("tiny-ti2v", Tiling(8, 4), 45.0),
    ("tiny-t2v", Tiling(12, 4), 45.0),
])
def test_tiled_matches_untiled_on_trained_vaes(task, tiling, floor):
    vae = load_vae(discover(checkpoint_dir(task)).vae, task)
    video = mosaic(task)
    with torch.no_grad():
        z = vae.encode(video)
        full = vae.decode(z)
        tiled = vae.decode_tiled(z, tiling)
        z_tiled = vae.encode_tiled(video, tiling)
    assert len(tiling.spans(z.shape[-1])) > 1
    assert tiled.shape == full.shape and psnr(tiled, full) >= floor
    assert float((z_tiled - z).norm() / z.norm()) < 0.02


def test_generate_picks_and_records_the_tiling(tmp_path):
    from wanlite import generate
    from wanlite.pipelines.resolve import vae_tiling
    from wanlite.pipelines.video_io import read_mp4_metadata

    assert vae_tiling(None, 8, (8, 8)) is None  # the frame fits one default tile
    assert vae_tiling(None, 8, (90, 160)) == Tiling(32, 12)  # 720p on the Wan2.1 VAE: 256-pixel tiles
    assert vae_tiling(None, 16, (44, 80)) == Tiling(16, 6)
    assert vae_tiling(0, 8, (90, 160)) is None and vae_tiling(6, 8, (8, 8)) == Tiling(6, 2)
    from PIL import Image

    from wanlite.eval import psnr as frame_psnr
    from wanlite.tiny.data import Clip, Sprite, render

    clip = Clip((Sprite("red", "square", "moving right", (40.0, 64.0)),), "black", "")
    first = render(clip, 128, 1, 4.0)[0]
    Image.fromarray(first).save(tmp_path / "first.png")
    # image-to-video: the first frame is encoded in tiles too, and must survive them
    out = generate(task="tiny-ti2v", prompt="a red square moving right on a black background", seed=0,
                   ckpt_dir=checkpoint_dir("tiny-ti2v"), image=tmp_path / "first.png", dtype="fp32", vae_tile=6,
                   steps=4, output_dir=tmp_path)
    assert out.frames.shape == (17, 128, 128, 3)
    assert frame_psnr(out.frames[0], first) >= 25
    assert [read_mp4_metadata(out.path)["job"]["vae"][k] for k in ("tile", "overlap")] == [6, 2]


def test_bad_vae_tile_is_one_line(tmp_path, capsys):
    from wanlite.cli import main

    assert main(["generate", "--task", "tiny-t2v", "--prompt", "p", "--ckpt_dir", str(checkpoint_dir("tiny-t2v")),
                 "--vae-tile", "2"]) == 2
    assert "--vae-tile 2: give a tile of at least 4 latent pixels" in capsys.readouterr().err


def test_bf16_vae_decode_is_close_to_fp32(tmp_path):
    """`--vae_dtype bf16` halves the VAE's memory; the video stays within 30 dB of the official fp32 decode."""
    import math

    import numpy as np

    from wanlite import generate
    from wanlite.pipelines.video_io import read_mp4_metadata
    from wanlite.testing.fixtures import write_fixture

    ckpt = write_fixture("ti2v-5B", "official", tmp_path / "ck")
    args = dict(task="ti2v-5B", prompt="a red square", ckpt_dir=ckpt, size=(64, 64), frames=5, steps=2, seed=4,
                dtype="fp32")
    full = generate(**args, save_file=tmp_path / "a.mp4")
    half = generate(**args, save_file=tmp_path / "b.mp4", vae_dtype="bf16")
    mse = np.mean((full.frames.astype(float) - half.frames.astype(float)) ** 2)
    assert mse == 0 or 10 * math.log10(255**2 / mse) > 30
    assert read_mp4_metadata(half.path)["job"]["vae"]["dtype"] == "bf16"


def test_untiled_decode_streams_frames_to_the_writer(tmp_path, monkeypatch):
    """Without tiles, frames reach the mp4 as the causal decoder yields them: the whole-video `decode` is
    never called, and the chunks concatenate to exactly what it returns."""
    import numpy as np
    import torch

    from wanlite import generate
    from wanlite.models.vae import WanVAE
    from wanlite.specs import TINY_VAE_SPECS
    from wanlite.testing.fixtures import write_fixture

    torch.manual_seed(0)
    vae = WanVAE(TINY_VAE_SPECS["vae2.1"]).eval()
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(vae.decode(z), torch.cat(list(vae.decode_chunks(z)), dim=2))

    ckpt = write_fixture("t2v-A14B", "official", tmp_path / "ck")
    args = dict(task="t2v-A14B", prompt="a red square", ckpt_dir=ckpt, size=(64, 32), frames=9, steps=2, seed=4,
                dtype="fp32", vae_tile=0)
    whole = generate(**args, save_file=tmp_path / "a.mp4")

    def refuse(*a, **k):
        raise AssertionError("the whole video was decoded at once")

    monkeypatch.setattr(WanVAE, "decode", refuse)
    streamed = generate(**args, save_file=tmp_path / "b.mp4")
    assert np.array_equal(whole.frames, streamed.frames) and streamed.frames.shape[0] == 9
