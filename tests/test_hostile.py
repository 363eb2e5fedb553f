"""Hostile and broken input (issue 38): each class stops with one line naming the problem and the fix, a non-zero
exit code, and no file left half-written — checkpoint code never runs, damaged bytes are never used silently,
absurd requests are refused before any work."""
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from wanlite.cli import main
from wanlite.errors import CheckpointError, WanliteError
from wanlite.pipelines.request import MAX_FRAMES, MAX_SEED, MAX_SIDE, MAX_STEPS, Request, request_with, validate
from wanlite.pipelines.video_io import Mp4Writer, OutputError, write_mp4
from wanlite.tiny import checkpoint_dir
from wanlite.testing.inputs import write_png_header
from wanlite.tiny.lora import LORA_DIR

shell_ffmpeg = pytest.mark.skipif(os.name == "nt", reason="the failing ffmpeg stand-in is a shell script")


def tiny(*flags: str, ckpt: Path | None = None) -> list[str]:
    """`wanlite generate` on the bundled tiny model (two 2-step experts, 5 frames) with `flags`."""
    return ["generate", "--task", "tiny-t2v", "--prompt", "a cat", "--frame_num", "5", "--sample_steps", "2",
            "--ckpt_dir", str(ckpt or checkpoint_dir("tiny-t2v")), *flags]


def one_error_line(capsys, code: int, want: int = 2) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == want and len(err) == 1 and err[0].startswith("wanlite: error: "), (code, err)
    return err[0]


# --- checkpoint code never runs -------------------------------------------------------------------------------

def plant_remote_code(folder: Path, config_name: str, auto_class: str) -> Path:
    """A config asking for the folder's own class, and the .py that would leave a marker if it ever ran."""
    marker = folder.parent / f"{folder.name}-code-ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                    "class Evil: pass\n")
    config_path = folder / config_name
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["auto_map"] = {auto_class: ["evil.Evil", None] if auto_class == "AutoTokenizer" else "evil.Evil"}
    config_path.write_text(json.dumps(config))
    return marker


def test_a_tokenizer_folder_asking_to_run_code_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "ck"
    shutil.copytree(checkpoint_dir("tiny-t2v"), ckpt)
    marker = plant_remote_code(ckpt / "google" / "umt5-xxl", "tokenizer_config.json", "AutoTokenizer")
    line = one_error_line(capsys, main(tiny("--save_file", str(tmp_path / "v.mp4"), ckpt=ckpt)))
    assert "auto_map" in line and "never runs checkpoint code" in line
    assert not marker.exists() and not (tmp_path / "v.mp4").exists()


def test_transformers_is_always_told_not_to_trust_remote_code(monkeypatch):
    import transformers

    from wanlite.models.t5 import load_tokenizer

    seen = {}
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, **kw: seen.update(kw))
    load_tokenizer(checkpoint_dir("tiny-t2v") / "google" / "umt5-xxl")
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


def test_a_wav2vec_folder_asking_to_run_code_is_refused(tmp_path):
    from wanlite.pipelines.audio import SpeechEncoder

    folder = tmp_path / "wav2vec"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    marker = plant_remote_code(folder, "config.json", "AutoModel")
    with pytest.raises(CheckpointError, match="auto_map"):
        SpeechEncoder(folder)
    assert not marker.exists()


# --- a full disk never leaves a video under the final name ---------------------------------------------------

def fake_ffmpeg(tmp_path: Path, reads_all: bool) -> str:
    """An ffmpeg that writes a few bytes of the file and fails as a full disk does: at the end (the trailer), or
    at once (the frames then meet a closed pipe)."""
    script = tmp_path / "ffmpeg"
    script.write_text("#!/bin/sh\nfor last; do :; done\n" + ("cat > /dev/null\n" if reads_all else "")
                      + 'printf "\\000\\000\\000\\040ftypisom" > "$last"\n'
                      + 'echo "[out#0/mp4] Error writing trailer: No space left on device" >&2\nexit 1\n')
    script.chmod(0o755)
    return str(script)


@shell_ffmpeg
@pytest.mark.parametrize("reads_all", [True, False], ids=["fails-at-trailer", "fails-at-once"])
def test_a_failed_mp4_write_leaves_nothing(tmp_path, monkeypatch, reads_all):
    import imageio_ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: fake_ffmpeg(tmp_path, reads_all))
    out = tmp_path / "out"
    frames = np.zeros((40, 64, 64, 3), np.uint8)  # 480 KB: more than a pipe holds, so a dead ffmpeg is noticed
    with pytest.raises(OutputError, match="No space left on device.*free disk space"):
        write_mp4(frames, out / "v.mp4", fps=16)
    assert list(out.iterdir()) == []


@shell_ffmpeg
def test_a_full_disk_in_generate_exits_non_zero_with_one_line(tmp_path, monkeypatch, capsys):
    import imageio_ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: fake_ffmpeg(tmp_path, True))
    out = tmp_path / "out"
    code = main(tiny("--save_file", str(out / "v.mp4"), "--preview"))
    line = one_error_line(capsys, code, want=OutputError.exit_code)
    assert "No space left on device" in line and code != 0
    assert list(out.iterdir()) == []  # neither the video, its temp file nor a preview


def dead_pid() -> int:
    """A pid no process has (above Linux's default pid_max of 2^22)."""
    return next(pid for pid in range(2**22 + 1, 2**22 + 100) if not psutil.pid_exists(pid))


def test_a_stale_temp_file_of_a_killed_run_is_cleaned(tmp_path):
    stale = tmp_path / f".v.int.{dead_pid()}.partial.mp4"
    mine = tmp_path / f".w.{os.getpid()}.partial.mp4"  # this pid, not being written: a restarted container
    alive = tmp_path / f".x.{os.getppid()}.partial.mp4"  # a run still writing
    other = tmp_path / "notes.partial.txt"
    for path in (stale, mine, alive, other):
        path.write_bytes(b"x")
    write_mp4(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "new.mp4", fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["new.mp4", alive.name, other.name])


@pytest.mark.parametrize("to", ["fp8", "gguf-q8_0"])
def test_a_full_disk_during_convert_leaves_nothing(tmp_path, monkeypatch, capsys, to):
    import errno

    import wanlite.pipelines.convert as convert_mod
    from wanlite.testing.fixtures import write_fixture

    ckpt = write_fixture("t2v-A14B", "official", tmp_path / "ck")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".wan.{dead_pid()}.partial.gguf"
    stale.write_bytes(b"x")  # a convert killed earlier
    sink = convert_mod._GGUFOut if to.startswith("gguf") else convert_mod._SafetensorsOut
    calls = []

    def full(self, name, tensor):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, tensor)

    original = sink.write
    monkeypatch.setattr(sink, "write", full)
    line = one_error_line(capsys, main(["convert", "--ckpt_dir", str(ckpt), "--task", "t2v-A14B", "--to", to,
                                        "--out", str(out)]))
    assert "No space left on device" in line and "free disk space" in line
    assert list(out.iterdir()) == []


# --- damaged bytes are never used silently ---------------------------------------------------------------------

def test_a_flipped_byte_in_the_offload_cache_is_detected(tmp_path):
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import expert_components, load_dit
    from wanlite.offload import OffloadConfig, open_offloaded
    from wanlite.offload.stores import CacheDamaged, DiskCache
    from wanlite.specs import TINY_DIT_SPECS
    from wanlite.testing.fixtures import write_fixture

    task = "t2v-A14B"
    comps = expert_components(discover(write_fixture(task, "official", tmp_path / "ck")), task)
    config = OffloadConfig("block", 0, 1, "disk", cache_dir=tmp_path / "cache")
    open_offloaded(comps, task, torch.bfloat16, None, config, "cpu").finish()  # writes the cache
    folder = next(p for p in (tmp_path / "cache").iterdir() if "high_noise" in p.name)
    victim = folder / "block_000.bin"
    good = victim.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # same size: only the checksum can tell
    victim.write_bytes(bytes(flipped))

    # read directly (the merged-LoRA cache does): refused, and the cache marked for a rebuild
    manifest = json.loads((folder / "manifest.json").read_text())
    cache = DiskCache(folder, manifest["fingerprint"])
    cache.manifest = manifest
    with pytest.raises(CacheDamaged, match="fails its checksum"):
        cache.read(0, torch.empty(len(good), dtype=torch.uint8))
    assert not (folder / "manifest.json").exists()

    # offloading: the piece is read again from the checkpoint and rewritten; the output is the plain model's
    open_offloaded(comps, task, torch.bfloat16, None, config, "cpu").finish()  # rebuilt (manifest was dropped)
    victim.write_bytes(bytes(flipped))
    engine = open_offloaded(comps, task, torch.bfloat16, None, config, "cpu")
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 16, 2, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 7,
                                                                                      TINY_DIT_SPECS[task].text_dim)
    engine.set_schedule(["high_noise"])
    with pytest.warns(RuntimeWarning, match="fails its checksum.*rebuilt"), torch.no_grad():
        got = engine.activate("high_noise")(x, t, ctx)
    engine.finish()
    with torch.no_grad():
        want = load_dit(comps["high_noise"], task, torch.bfloat16)(x, t, ctx)
    assert torch.equal(got, want) and victim.read_bytes() == good


@pytest.mark.parametrize("layout, swapped", [
    ("official", "high_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors"),
    ("comfy", "diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors"),
], ids=["shard", "single-file"])
def test_a_file_copied_from_the_other_expert_is_refused_by_check_and_generate(tmp_path, capsys, layout, swapped):
    from wanlite.pipelines.resolve import resolve
    from wanlite.testing.fixtures import write_fixture

    root = write_fixture("t2v-A14B", layout, tmp_path / "ck")
    check = ["check", "--task", "t2v-A14B", "--ckpt_dir", str(root)]
    assert main(check) == 0  # two distinct experts pass (the bundled tiny ones are distinct too)
    capsys.readouterr()
    shutil.copy(root / swapped.replace("high_noise", "low_noise"), root / swapped)
    line = one_error_line(capsys, main(check))
    assert f"{root / swapped}: holds the same bytes as the low-noise expert's" in line and "re-download" in line
    with pytest.raises(CheckpointError) as generate_error:  # generate resolves through the same check
        resolve(Request("t2v-A14B", "a cat", ckpt_dir=root, size=(64, 32), frames=5, steps=2))
    assert str(generate_error.value) == line.removeprefix("wanlite: error: ")


@pytest.fixture(scope="module")
def tiny_lora():
    return load_file(str(LORA_DIR / "high_noise_model.safetensors"))


@pytest.mark.parametrize("what", ["weight", "alpha"])
def test_nan_in_a_lora_is_refused(tmp_path, capsys, tiny_lora, what):
    tensors = dict(tiny_lora)
    key = next(k for k in tensors if k.endswith("lora_up.weight" if what == "weight" else ".alpha"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    line = one_error_line(capsys, main(tiny("--lora_high", str(path), "--save_file", str(tmp_path / "v.mp4"))))
    assert key in line and "NaN/Inf" in line and not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf"])
def test_a_non_finite_lora_strength_is_refused(tmp_path, capsys, strength):
    line = one_error_line(capsys, main(tiny("--lora", f"{LORA_DIR / 'high_noise_model.safetensors'}:{strength}")))
    assert "not a finite number" in line


@pytest.mark.parametrize("scale", ["inf", "nan", "3,inf"])
def test_a_non_finite_guide_scale_is_refused(capsys, scale):
    line = one_error_line(capsys, main(tiny("--sample_guide_scale", scale)))
    assert "--sample_guide_scale" in line and "not a finite number" in line
    with pytest.raises(WanliteError, match="not a finite number"):
        validate(request_with(Request("tiny-t2v", "a cat"), guide_scale=float("inf")), seed=0, files=False)


def test_a_guide_scale_that_overflows_stops_the_run_with_one_line(tmp_path, capsys):
    line = one_error_line(capsys, main(tiny("--sample_guide_scale", "1e300", "--save_file", str(tmp_path / "v.mp4"))),
                          want=1)
    assert "guidance at step 1 gave non-finite values" in line and "smaller --sample_guide_scale" in line
    assert list(tmp_path.iterdir()) == []  # no black video


def test_save_file_over_an_existing_file_needs_overwrite(tmp_path, capsys):
    existing = tmp_path / "mine.mp4"
    existing.write_bytes(b"precious")
    line = one_error_line(capsys, main(tiny("--save_file", str(existing))))
    assert "already exists" in line and "--overwrite" in line and existing.read_bytes() == b"precious"
    req = Request("tiny-t2v", "a cat", ckpt_dir=checkpoint_dir("tiny-t2v"), save_file=existing)
    validate(replace(req, overwrite=True), seed=0)  # asked for: allowed


def test_a_failed_rewrite_keeps_the_previous_video(tmp_path):
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, (16, 16), 8) as writer:
        writer.append(np.zeros((2, 16, 16, 3), np.uint8))
    size = path.stat().st_size
    with pytest.raises(ValueError), Mp4Writer(path, (16, 16), 8) as writer:
        writer.append(np.zeros((2, 8, 8, 3), np.uint8))  # a failed second write leaves the first video intact
    assert path.stat().st_size == size and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


# --- absurd requests are refused before any work, naming the limit -----------------------------------------------

@pytest.mark.parametrize("flags, limit", [
    (["--size", "100000*100000"], f"at most {MAX_SIDE} px a side"),
    (["--frame_num", "2147483649"], f"at most {MAX_FRAMES} frames"),
    (["--sample_steps", "1000000000"], f"at most {MAX_STEPS}"),
    (["--base_seed", str(2**64)], f"at most {MAX_SEED}"),
], ids=["size", "frames", "steps", "seed"])
def test_absurd_requests_are_refused_naming_the_limit(capsys, flags, limit):
    line = one_error_line(capsys, main(tiny(*flags)))
    assert limit in line


@pytest.mark.parametrize("side", [10000, 20000], ids=["100Mpx", "400Mpx"])
def test_a_huge_image_is_refused_from_its_header(tmp_path, capsys, side):
    image = write_png_header(tmp_path / "big.png", side, side)
    line = one_error_line(capsys, main(["generate", "--task", "tiny-ti2v", "--prompt", "a cat", "--image",
                                        str(image), "--ckpt_dir", str(checkpoint_dir("tiny-ti2v"))]))
    assert "Mpx" in line and "downscale" in line


def test_images_read_from_files_have_the_image_limit_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from wanlite.pipelines.animate import read_sources
    from wanlite.pipelines.conditioning import load_image
    from wanlite.testing.inputs import write_sources

    folder = write_sources(tmp_path / "animate", frames=2, face=32)
    write_png_header(folder / "src_ref.png", 9000, 8000)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))  # no pixel is decoded
    with pytest.raises(WanliteError, match=r"--image .*big.png: 10000\*10000 px is more than the limit of 67 Mpx"):
        load_image(write_png_header(tmp_path / "big.png", 10000, 10000))
    with pytest.raises(WanliteError, match=r"the reference image .*src_ref.png: 9000\*8000 px is more than"):
        read_sources(folder, replace=False, face_size=32)
    assert decoded == []
