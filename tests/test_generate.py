import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wanlite import generate
from wanlite.cli import main
from wanlite.pipelines.video_io import read_mp4, read_mp4_metadata
from wanlite.testing.fixtures import write_fixture

REPO = Path(__file__).resolve().parents[1]
TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B")
LAYOUTS = ("official", "diffusers", "comfy")
SMALL = {"t2v-A14B": (64, 32), "i2v-A14B": (64, 32), "ti2v-5B": (64, 64)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {(t, lay): write_fixture(t, lay, root / f"{t}-{lay}") for t in TASKS for lay in LAYOUTS}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "input.png"
    rgb = np.zeros((90, 160, 3), np.uint8)
    rgb[20:60, 30:80] = (220, 40, 40)
    Image.fromarray(rgb).save(path)
    return path


def _run(ckpts, input_image, task, layout, out, **kw):
    args = dict(task=task, prompt="a red square moving right on a black background", ckpt_dir=ckpts[task, layout],
                size=SMALL[task], frames=9, steps=4, seed=11, dtype="fp32", save_file=out)
    if task == "i2v-A14B":
        args["image"] = input_image
    args.update(kw)
    return generate(**args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", TASKS)
def test_generate_writes_a_valid_mp4(ckpts, image, tmp_path, task, layout):
    result = _run(ckpts, image, task, layout, tmp_path / "v.mp4")
    frames, info = read_mp4(result.path)
    w, h = result.settings.size
    assert frames.shape == (9, h, w, 3) and tuple(info["size"]) == (w, h)
    assert info["fps"] == {"ti2v-5B": 24}.get(task, 16)
    assert result.frames.shape == frames.shape and result.frames.std() > 1  # not a flat frame
    meta = read_mp4_metadata(result.path)["job"]["settings"]
    assert meta["task"] == task and meta["seed"] == 11 and meta["steps"] == 4 and meta["frames"] == 9


def test_same_seed_same_frames_and_other_seed_differs(ckpts, image, tmp_path):
    a = _run(ckpts, image, "t2v-A14B", "official", tmp_path / "a.mp4")
    b = _run(ckpts, image, "t2v-A14B", "official", tmp_path / "b.mp4")
    c = _run(ckpts, image, "t2v-A14B", "official", tmp_path / "c.mp4", seed=12)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize("task,shift,high_steps", [("t2v-A14B", 12.0, 26), ("i2v-A14B", 5.0, 15)])
def test_moe_switch_at_the_official_step(ckpts, image, tmp_path, task, shift, high_steps):
    events = []
    _run(ckpts, image, task, "official", tmp_path / "m.mp4", steps=40, size=(32, 32), frames=5,
         progress=events.append)
    switches = [(e["role"], e["step"]) for e in events if e["event"] == "expert"]
    assert switches == [("high_noise", 0), ("low_noise", high_steps)]
    steps = [e for e in events if e["event"] == "step"]
    assert steps[high_steps - 1]["role"] == "high_noise" and steps[high_steps]["role"] == "low_noise"
    assert steps[-1]["role_i"] == steps[-1]["role_total"] == 40 - high_steps


def test_ti2v_image_keeps_the_first_frame(ckpts, image, tmp_path):
    with_image = _run(ckpts, None, "ti2v-5B", "official", tmp_path / "i.mp4", image=image)
    without = _run(ckpts, image, "ti2v-5B", "official", tmp_path / "t.mp4")
    assert with_image.settings.image is not None and without.settings.image is None
    assert not np.array_equal(with_image.frames[0], without.frames[0])


def test_cli_generate_and_info_roundtrip(ckpts, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    code = main(["generate", "--task", "t2v-A14B", "--ckpt_dir", str(ckpts["t2v-A14B", "comfy"]), "--prompt", "a cat",
                 "--size", "64*32", "--frame_num", "5", "--sample_steps", "3", "--base_seed", "5",
                 "--sample_guide_scale", "2.5,4.5", "--save_file", str(out), "--preview", "--dtype", "fp32"])
    assert code == 0 and out.is_file() and out.with_suffix(".png").is_file()
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "high noise" in printed and f"wrote {out}" in printed
    assert main(["info", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    settings = meta["job"]["settings"]
    assert settings["guide_scale"] == [2.5, 4.5] and settings["size"] == [64, 32] and settings["seed"] == 5
    assert settings["prompt"] == "a cat" and settings["solver"] == "unipc" and "wanlite" in meta


def test_long_prompt_warns(ckpts, tmp_path):
    events = []
    _run(ckpts, None, "ti2v-5B", "official", tmp_path / "w.mp4", prompt="red " * 600, steps=1,
         progress=events.append)
    assert any(e["event"] == "warning" and "601 tokens" in e["message"] for e in events)  # 600 words + </s>


@pytest.mark.parametrize("extra,message", [
    (["--size", "1000*720"], "not a multiple of 16"),
    (["--frame_num", "80"], "4k+1"),
    (["--image", "IMAGE"], "--image is not used by t2v-A14B"),
    (["--task", "x2v"], "unknown --task 'x2v'"),
    (["--ckpt_dir", "/nonexistent"], "does not exist"),
    (["--task", "i2v-A14B"], "pass --image"),
    (["--task", "i2v-A14B", "--image", "/nonexistent.png"], "does not exist"),
    (["--task", "i2v-A14B", "--image", "NOT_AN_IMAGE"], "is not a readable image"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(ckpts, image, tmp_path, extra, message):
    bogus = tmp_path / "notes.png"
    bogus.write_text("just text")
    args = ["generate", "--task", "t2v-A14B", "--ckpt_dir", str(ckpts["t2v-A14B", "official"]), "--prompt", "a",
            "--size", "64*32", "--frame_num", "5", "--sample_steps", "1", "--output-dir", str(tmp_path / "out")]
    extra = [str(image) if e == "IMAGE" else str(bogus) if e == "NOT_AN_IMAGE" else e for e in extra]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    run = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    line = run.stderr.strip()
    assert "\n" not in line and line.startswith("wanlite: error: ") and message in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
