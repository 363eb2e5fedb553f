"""Step checkpoints: a run stopped by a signal or by running out of memory resumes to the same frames, bit for bit.

Faults come from the WANLITE_FAULT test hook (wanlite.pipelines.resume.inject): `pause` lets a test send a real
signal to a subprocess from outside, `sigint` / `sigterm` make the process signal itself, `oom` raises
torch.OutOfMemoryError in a step or in the decode.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wanlite import generate
from wanlite.cli import main
from wanlite.errors import Interrupted, OutOfMemory, WanliteError
from wanlite.pipelines import resume as resume_mod
from wanlite.pipelines.resume import FAULT_ENV, read_checkpoint, resume_path
from wanlite.pipelines.video_io import read_mp4
from wanlite.testing.fixtures import write_fixture
from wanlite.testing.inputs import write_wav

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red square moving right"
S2V_HISTORY = 9  # pixel frames of S2V motion history (3 latents)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rgb = np.zeros((80, 64, 3), np.uint8)
    rgb[20:50, 16:48] = (230, 180, 150)
    Image.fromarray(rgb).save(root / "face.png")
    s2v = write_fixture("s2v-14B", "official", root / "s2v")
    config = json.loads((s2v / "config.json").read_text())
    config["motion_frames"] = S2V_HISTORY  # not the released 73: the VAE's time goes with the history's length
    (s2v / "config.json").write_text(json.dumps(config))
    return {"t2v": write_fixture("t2v-A14B", "official", root / "t2v"),
            "ti2v": write_fixture("ti2v-5B", "official", root / "ti2v"),
            "s2v": s2v, "image": root / "face.png", "audio": write_wav(root / "speech.wav", 0.8)}


@pytest.fixture
def fault(monkeypatch):
    """fault("oom@step:3") sets the hook for this test only (each entry fires once per `fault` call)."""
    def set_fault(spec: str) -> None:
        monkeypatch.setenv(FAULT_ENV, spec)
        resume_mod._fired.clear()
    yield set_fault
    resume_mod._fired.clear()


def t2v(inputs, **kw):
    return {**dict(task="t2v-A14B", prompt=PROMPT, ckpt_dir=inputs["t2v"], size=(64, 32), frames=5, steps=6, seed=7,
                   dtype="fp32"), **kw}


@pytest.fixture(scope="module")
def clean(inputs, tmp_path_factory):
    """The uninterrupted T2V-A14B run every interrupted one must equal: its frames and the mp4's."""
    result = generate(**t2v(inputs, save_file=tmp_path_factory.mktemp("clean") / "clean.mp4"), progress=False)
    return result.frames, read_mp4(result.path)[0]


def cli_args(options: dict) -> list[str]:
    flags = {"task": "--task", "prompt": "--prompt", "ckpt_dir": "--ckpt_dir", "frames": "--frame_num",
             "steps": "--sample_steps", "seed": "--base_seed", "dtype": "--dtype", "save_file": "--save_file"}
    args = ["generate", "--size", "*".join(map(str, options["size"]))]
    for name, flag in flags.items():
        args += [flag, str(options[name])]
    return args


def test_sigterm_from_outside_then_the_same_command_resumes_across_the_expert_switch(inputs, clean, tmp_path,
                                                                                      capsys):
    out = tmp_path / "v.mp4"
    args = cli_args(t2v(inputs, save_file=out))
    proc = subprocess.Popen([sys.executable, "-m", "wanlite.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, FAULT_ENV: "pause@step:3"})
    for line in proc.stderr:  # the child stops at step 3 of 6 (high-noise) until the signal comes
        if "paused at step 3" in line:
            break
    proc.send_signal(signal.SIGTERM)
    last = proc.stderr.read().strip().splitlines()
    assert proc.wait(timeout=60) == 143
    assert last[-1].startswith("wanlite: interrupted at step 2/6; resume with: wanlite generate ")
    assert last[-1].endswith(f"--resume {resume_path(out)}")
    assert resume_path(out).is_file() and not out.exists() and not list(tmp_path.glob(".*partial*"))
    saved = read_checkpoint(resume_path(out)).checkpoint
    assert (saved.run, saved.step, saved.carry["next"]) == (0, 2, 2) and len(saved.carry["history"]) == 2

    assert main(args) == 0  # the same command again finds the file and says so
    printed = capsys.readouterr().out
    assert f"resuming from {resume_path(out)} after step 2/6" in printed
    assert "step 3/6  high noise 3/4" in printed and "step 5/6  low noise 1/2" in printed  # then the switch
    assert np.array_equal(read_mp4(out)[0], clean[1])
    assert not resume_path(out).exists()  # used up


def test_sigterm_during_decode_leaves_no_partial_and_resume_flag_matches(inputs, clean, tmp_path):
    out = tmp_path / "d.mp4"
    args = cli_args(t2v(inputs, save_file=out))
    run = subprocess.run([sys.executable, "-m", "wanlite.cli", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, FAULT_ENV: "sigterm@decode"}, timeout=120)
    assert run.returncode == 143, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("wanlite: interrupted in the decode after step 6/6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mp4.resume.pt"]  # no partial mp4
    moved = tmp_path / "elsewhere.pt"
    resume_path(out).rename(moved)
    assert main([*args, "--resume", str(moved)]) == 0
    assert np.array_equal(read_mp4(out)[0], clean[1]) and not moved.exists()


def test_ctrl_c_in_ti2v_with_an_image_resumes_bit_identical(inputs, tmp_path, fault, monkeypatch):
    options = dict(task="ti2v-5B", prompt=PROMPT, ckpt_dir=inputs["ti2v"], image=inputs["image"], size=(64, 64),
                   frames=5, steps=5, seed=3, dtype="fp32", solver="dpm++", save_file=tmp_path / "i.mp4")
    clean = generate(**{**options, "save_file": tmp_path / "clean.mp4"}, progress=False)
    fault("sigint@step:4")
    with pytest.raises(Interrupted) as stop:
        generate(**options, progress=False)
    assert stop.value.exit_code == 130 and stop.value.resume_file == resume_path(options["save_file"])
    monkeypatch.delenv(FAULT_ENV)
    resumed = generate(**options, progress=False)
    assert np.array_equal(resumed.frames, clean.frames)


def test_s2v_interrupted_mid_second_clip_resumes_bit_identical(inputs, tmp_path, fault, monkeypatch):
    options = dict(task="s2v-14B", prompt="a person talking", ckpt_dir=inputs["s2v"], image=inputs["image"],
                   audio=inputs["audio"], size=(64, 64), frames=8, steps=3, seed=5, dtype="fp32",
                   save_file=tmp_path / "talk.mp4")
    clean = generate(**{**options, "save_file": tmp_path / "clean.mp4"}, progress=False)
    fault("sigint@step:5")  # clip 2, its second step
    with pytest.raises(Interrupted):
        generate(**options, progress=False)
    saved = read_checkpoint(resume_path(options["save_file"])).checkpoint
    assert (saved.run, saved.step, saved.runs) == (1, 1, 2) and len(saved.pieces) == 1
    assert {"history", "motion"} <= set(saved.parts)
    assert saved.parts["history"].shape[2] == S2V_HISTORY  # the checkpoint's config.json sets the history
    monkeypatch.delenv(FAULT_ENV)
    resumed = generate(**options, progress=False)
    assert np.array_equal(resumed.frames, clean.frames) and resumed.settings.num_clip == 2
    assert np.array_equal(read_mp4(resumed.path)[0], read_mp4(clean.path)[0])


def test_oom_in_a_step_with_a_step_cache_replans_once_and_matches(inputs, tmp_path, fault):
    # TaylorSeer keeps per-expert, per-branch Taylor terms across steps: they are in the checkpoint
    options = t2v(inputs, steps=8, cache="taylorseer", cache_force=True, save_file=tmp_path / "c.mp4")
    clean = generate(**{**options, "save_file": tmp_path / "clean.mp4"}, progress=False)
    assert clean.cache["skipped_fraction"] > 0
    fault("oom@step:4")
    events = []
    again = generate(**options, progress=events.append)
    lines = [e["message"] for e in events if e["event"] == "warning" and "re-planned" in e["message"]]
    assert len(lines) == 1 and lines[0].startswith("out of memory at step 3/8")
    assert lines[0].endswith("resuming after step 3/8")
    assert np.array_equal(again.frames, clean.frames) and again.cache == clean.cache
    assert not resume_path(options["save_file"]).exists()


def test_oom_in_a_step_and_in_the_decode_replans_each_time_and_matches(inputs, clean, tmp_path, fault):
    fault("oom@step:3,oom@decode")
    events = []
    again = generate(**t2v(inputs, save_file=tmp_path / "o.mp4"), progress=events.append)
    lines = [e["message"] for e in events if e["event"] == "warning" and "re-planned" in e["message"]]
    assert [line.split(";")[0] for line in lines] == ["out of memory at step 2/6",
                                                      "out of memory in the decode after step 6/6"]
    assert np.array_equal(again.frames, clean[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]  # no resume file, no partial mp4 left


def test_oom_three_times_stops_with_the_resume_file_which_then_matches(inputs, clean, tmp_path, fault,
                                                                        monkeypatch):
    out = tmp_path / "x.mp4"
    fault("oom@step:3*3")
    with pytest.raises(OutOfMemory) as stop:
        generate(**t2v(inputs, save_file=out), progress=False)
    assert "after re-planning 2 times" in str(stop.value) and f"--resume {resume_path(out)}" in str(stop.value)
    assert stop.value.exit_code == 1 and resume_path(out).is_file() and not out.exists()
    monkeypatch.delenv(FAULT_ENV)
    resumed = generate(**t2v(inputs, save_file=out), progress=False)
    assert np.array_equal(resumed.frames, clean[0])


def test_a_resume_file_for_another_job_or_not_a_resume_file_is_one_line_exit_2(inputs, tmp_path, fault, capsys):
    out = tmp_path / "j.mp4"
    fault("sigint@step:2")
    with pytest.raises(Interrupted):
        generate(**t2v(inputs, save_file=out), progress=False)
    args = cli_args(t2v(inputs, save_file=out))
    assert main([*args[:-2], "--base_seed", "8", *args[-2:]]) == 2  # another seed
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "written for another job (its seed differs)" in line
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "job": Path("x")}, evil)  # an object weights_only refuses to build
    assert main([*args, "--resume", str(evil)]) == 2
    assert "is not a wanlite resume file" in capsys.readouterr().err
    with pytest.raises(WanliteError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_oom_before_the_steps_replans_then_stops_with_one_line_naming_the_stage(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from wanlite.pipelines import run
    from wanlite.pipelines.segments import KINDS
    from wanlite.tiny import checkpoint_dir

    real, calls = run.encode_text, []

    def encode_text(*args, fails: int):
        calls.append(1)
        if len(calls) <= fails:
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return real(*args)

    options = dict(task="tiny-t2v", prompt=PROMPT, ckpt_dir=checkpoint_dir("tiny-t2v"), frames=5, steps=2, seed=1)
    clean = generate(**options, save_file=tmp_path / "clean.mp4", progress=False)
    monkeypatch.setattr(run, "encode_text", lambda *args: encode_text(*args, fails=1))
    events = []
    again = generate(**options, save_file=tmp_path / "again.mp4", progress=events.append)
    line = next(e["message"] for e in events if e["event"] == "warning" and "re-planned" in e["message"])
    assert line.startswith("out of memory loading or running the text encoder on cpu; add --t5_cpu")
    assert np.array_equal(again.frames, clean.frames)
    calls.clear()
    monkeypatch.setattr(run, "encode_text", lambda *args: encode_text(*args, fails=3))
    args = ["generate", "--task", "tiny-t2v", "--prompt", PROMPT, "--ckpt_dir", str(checkpoint_dir("tiny-t2v")),
            "--frame_num", "5", "--sample_steps", "2", "--save_file", str(tmp_path / "x.mp4")]
    assert main(args) == 1 and len(calls) == 3  # the run and two re-plans
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "after re-planning 2 times (out of memory loading or running the text encoder" in err[0]
    assert "--t5_cpu" in err[0] and not (tmp_path / "x.mp4").exists()

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (a test)")

    monkeypatch.setattr(run, "encode_text", real)  # the image / audio encoders' stage: the same, named
    monkeypatch.setitem(KINDS, "text", replace(KINDS["text"], runs=no_memory))
    with pytest.raises(OutOfMemory, match="out of memory preparing the conditioning inputs; free GPU memory"):
        generate(**options, save_file=tmp_path / "y.mp4", progress=False)
