"""Resolve once, then execute: `wanlite plan --json` prints the job that `generate` runs and records in the mp4,
fallbacks included; a profile saved from a plan replays it."""
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wanlite.cli import main
from wanlite.loading.models import expert_components, load_dit
from wanlite.loading.checkpoints import discover
from wanlite.pipelines.video_io import read_mp4_metadata
from wanlite.testing.fixtures import write_fixture
from wanlite.testing.inputs import write_sources, write_wav
from wanlite.testing.lora_files import random_pairs, write_lora

SMALL = {"t2v-A14B": "64*32", "i2v-A14B": "64*32", "ti2v-5B": "64*64", "s2v-14B": "64*64", "animate-14B": "64*64"}
FRAMES = {"s2v-14B": "8", "animate-14B": "9"}  # S2V: frames per clip (4k); Animate: per segment (4k+1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    ckpts = {task: write_fixture(task, "official", root / task) for task in SMALL}
    speech, sources = write_wav(root / "speech.wav", 0.8), write_sources(root / "animate")
    image = root / "in.png"
    rgb = np.zeros((90, 160, 3), np.uint8)
    rgb[20:60, 30:80] = (220, 40, 40)
    Image.fromarray(rgb).save(image)
    loras = {}
    for task in ("t2v-A14B", "ti2v-5B"):
        comp = next(iter(expert_components(discover(ckpts[task]), task).values()))
        loras[task] = write_lora(root / f"{task}-lora.safetensors",
                                 random_pairs(load_dit(comp, task, torch.float32), rank=4, seed=1))
    return {"ckpts": ckpts, "image": image, "loras": loras, "root": root, "speech": speech, "sources": sources}


# (task, extra flags): each task, each kind of --quant, every offload / host-memory mode (mmap with a format
# quantized on load becomes disk: the case where the engine used to switch on its own), the LoRA modes
# (auto with fp8 becomes runtime), and step caches (off for a short schedule unless forced).
GRID = [
    ("t2v-A14B", []),
    ("t2v-A14B", ["--quant", "fp8", "--offload", "block", "--ram_mode", "mmap"]),
    ("t2v-A14B", ["--quant", "fp8", "--lora", "LORA:0.8", "--offload", "model"]),
    ("t2v-A14B", ["--lora_high", "LORA", "--lora_mode", "runtime", "--offload", "block", "--ram_mode", "mmap",
                  "--resident_blocks", "1"]),
    ("t2v-A14B", ["--cache", "safe", "--offload", "none"]),
    ("t2v-A14B", ["--cache", "dbcache", "--cache_threshold", "0.2", "--cache_force", "--offload", "block",
                  "--ram_mode", "disk", "--chunk_tokens", "16"]),
    ("i2v-A14B", ["--image", "IMAGE", "--quant", "int8", "--offload", "model", "--vae-tile", "4"]),
    ("ti2v-5B", ["--quant", "gguf-q8_0", "--offload", "block", "--ram_mode", "pinned", "--prefetch", "2"]),
    ("ti2v-5B", ["--image", "IMAGE", "--lora", "LORA", "--lora_mode", "merge", "--vae_dtype", "bf16", "--t5_cpu"]),
    ("s2v-14B", ["--image", "IMAGE", "--audio", "SPEECH", "--offload", "block", "--ram_mode", "mmap"]),
    ("animate-14B", ["--src_root_path", "SOURCES", "--quant", "fp8", "--offload", "model", "--cache", "fast",
                     "--cache_force"]),
]


def _flags(files, task, extra):
    subst = {"IMAGE": str(files["image"]), "LORA": str(files["loras"].get(task)),
             "LORA:0.8": f"{files['loras'].get(task)}:0.8", "SPEECH": str(files["speech"]),
             "SOURCES": str(files["sources"])}
    return ["--task", task, "--ckpt_dir", str(files["ckpts"][task]), "--prompt", "a red square moving right",
            "--size", SMALL[task], "--frame_num", FRAMES.get(task, "5"), "--sample_steps", "3", "--base_seed", "7", "--dtype", "fp32",
            "--device", "cpu", "--offload_cache", str(files["root"] / "offload"),
            *[subst.get(e, e) for e in extra]]


def _plan_json(args) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", *args, "--json"]) == 0
    return json.loads(out.getvalue())["job"]


@pytest.mark.parametrize("task,extra", GRID, ids=[f"{t}:{' '.join(e)}" for t, e in GRID])
def test_the_planned_job_is_the_job_that_runs(files, tmp_path, task, extra):
    args = _flags(files, task, extra)
    planned = _plan_json(args)
    assert main(["generate", *args, "--save_file", str(tmp_path / "v.mp4")]) == 0
    recorded = read_mp4_metadata(tmp_path / "v.mp4")["job"]
    assert recorded == planned
    if "mmap" in extra and "fp8" in extra:
        assert recorded["offload"]["ram_mode"] == "disk"
        assert any("re-quantize" in w for w in recorded["warnings"])
    if extra[:2] == ["--quant", "fp8"] and "--lora" in extra:
        assert {lora["mode"] for lora in recorded["loras"]} == {"runtime"}
    if "safe" in extra:
        assert recorded["step_cache"] is None and any("step caching is off" in w for w in recorded["warnings"])


def test_a_saved_profile_replays_the_job(files, tmp_path):
    args = _flags(files, "t2v-A14B", ["--quant", "fp8", "--offload", "block", "--ram_mode", "mmap",
                                      "--resident_blocks", "1", "--chunk_tokens", "16", "--vae-tile", "4"])
    planned = _plan_json([*args, "--save", str(tmp_path / "p.toml")])
    replay = _flags(files, "t2v-A14B", ["--profile", str(tmp_path / "p.toml")])
    replayed = _plan_json(replay)
    decisions = ("weights", "offload", "chunk_tokens", "step_cache", "text_encoder", "vae", "loras", "settings")
    assert {k: replayed[k] for k in decisions} == {k: planned[k] for k in decisions}
    assert main(["generate", *replay, "--save_file", str(tmp_path / "r.mp4")]) == 0
    assert read_mp4_metadata(tmp_path / "r.mp4")["job"] == replayed


def test_plan_before_download_takes_the_generate_flags(capsys):
    assert main(["plan", "--task", "t2v-A14B", "--size", "832*480", "--vram", "8", "--ram", "32",
                 "--sample_steps", "40", "--cache", "fast", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)["job"]
    assert job["device"] == "cuda" and job["weights"]["ckpt_dir"] is None
    assert job["step_cache"]["policy"] == "taylorseer" and job["predicted"]["peak_vram_gb"] < 8
    for task in ("i2v-A14B", "s2v-14B", "animate-14B"):  # their inputs are not needed to plan: --size stands in
        assert main(["plan", "--task", task, "--size", "832*480", "--profile", "12gb", "--json"]) == 0, task
        assert json.loads(capsys.readouterr().out)["job"]["settings"]["size"] == [832, 480]
    assert main(["plan", "--task", "t2v-A14B", "--lora", "x.safetensors", "--vram", "12"]) == 2
    assert "needs the checkpoint" in capsys.readouterr().err


def test_task_help_lists_every_task(capsys):
    from wanlite.specs import TASKS

    for command in ("generate", "plan"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(task in text for task in TASKS), command


def test_layers_import_only_downward():
    """models -> quant -> loading -> cache / lora -> offload -> planner -> pipelines -> cli: no module imports a
    layer above its own, at the top or inside a function. (quant sits below loading: loading quantizes each
    tensor as it streams in, the way the model is built on meta, swapped, then filled.)"""
    import ast

    root = Path(__file__).resolve().parents[1]
    layer = {"errors": 0, "_version": 0, "specs": 0, "archs": 0, "files": 0, "hf_folders": 0, "models": 0,
             "quant": 1, "loading": 2, "cache": 2,
             "lora": 3, "offload": 4, "parallel": 1, "planner": 5, "pipelines": 6}
    folders = {"models": "wanlite/models", "quant": "quant", "loading": "wanlite/loading", "cache": "cache",
               "lora": "wanlite/lora", "offload": "wanlite/offload", "planner": "wanlite/planner",
               "pipelines": "wanlite/pipelines"}
    wrong = []
    for name, folder in folders.items():
        for path in (root / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:  # relative imports stay inside the package
                    continue
                if node.module == "wanlite":
                    wrong.append(f"{folder}/{path.name} imports from the package face")
                elif node.module and node.module.startswith("wanlite."):
                    target = node.module.split(".")[1]
                    if layer.get(target, 99) > layer[name]:
                        wrong.append(f"{folder}/{path.name} imports {node.module}")
    assert not wrong, wrong


def test_replay_regenerates_the_same_frames_and_takes_overrides(files, tmp_path):
    from wanlite.pipelines.video_io import read_mp4

    args = _flags(files, "t2v-A14B", ["--quant", "fp8", "--lora_high", "LORA:0.8", "--offload", "block", "--ram_mode",
                                      "mmap", "--cache", "fast", "--cache_force", "--sample_guide_scale", "2.5,4"])
    assert main(["generate", *args, "--save_file", str(tmp_path / "a.mp4")]) == 0
    first = read_mp4_metadata(tmp_path / "a.mp4")["job"]
    # a replay asks for the resolved choices themselves, so the fallbacks taken the first time (mmap -> disk
    # here) are not notes any more; every decision is the same
    decided = lambda job: {k: v for k, v in job.items() if k != "warnings"}  # noqa: E731
    assert first["warnings"] and decided(_plan_json(["--replay", str(tmp_path / "a.mp4")])) == decided(first)
    assert main(["generate", "--replay", str(tmp_path / "a.mp4"), "--save_file", str(tmp_path / "b.mp4")]) == 0
    assert decided(read_mp4_metadata(tmp_path / "b.mp4")["job"]) == decided(first)
    assert np.array_equal(read_mp4(tmp_path / "a.mp4")[0], read_mp4(tmp_path / "b.mp4")[0])
    assert main(["generate", "--replay", str(tmp_path / "a.mp4"), "--base_seed", "5", "--frame_num", "9",
                 "--save_file", str(tmp_path / "c.mp4")]) == 0
    third = read_mp4_metadata(tmp_path / "c.mp4")["job"]
    assert third["settings"]["seed"] == 5 and third["settings"]["frames"] == 9
    assert {k: v for k, v in third["settings"].items() if k not in ("seed", "frames")} == \
        {k: v for k, v in first["settings"].items() if k not in ("seed", "frames")}
    assert third["loras"] == first["loras"] and third["step_cache"] == first["step_cache"]


def test_generate_without_task_or_prompt_says_which(capsys):
    assert main(["generate", "--prompt", "a cat"]) == 2
    assert "pass --task TASK (or --replay FILE.mp4)" in capsys.readouterr().err
    assert main(["generate", "--task", "t2v-A14B"]) == 2
    assert "pass --prompt TEXT" in capsys.readouterr().err


def test_replay_of_a_file_without_a_job_says_so(tmp_path, capsys):
    from wanlite.pipelines.video_io import write_mp4

    write_mp4(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "other.mp4", fps=8)
    assert main(["generate", "--replay", str(tmp_path / "other.mp4")]) == 2
    assert "carries no wanlite job" in capsys.readouterr().err
    assert main(["generate", "--replay", str(tmp_path / "missing.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("task,extra", [GRID[6], GRID[9], GRID[10]], ids=["i2v", "s2v", "animate"])
def test_a_pipeline_makes_each_task_kind_again_as_one_shot_does(files, tmp_path, task, extra):
    """The image encoded per call, S2V's clips and Animate's segments with the VAE held for the job, the
    models kept between the calls: the frames of a one-shot run, twice."""
    import wanlite
    from wanlite.cli import build_parser, request_from_args

    args = build_parser().parse_args(["generate", *_flags(files, task, extra), "--save_file",
                                      str(tmp_path / "one.mp4")])
    request = request_from_args(args)
    one_shot = wanlite.generate(request, progress=False)
    with wanlite.Pipeline(request, progress=False) as pipe:
        frames = [pipe.generate(save=False).frames for _ in range(2)]
        assert max(pipe.loads.values()) == 1
    assert all(np.array_equal(f, one_shot.frames) for f in frames)


@pytest.mark.parametrize("task,extra", [GRID[9], (GRID[10][0], [*GRID[10][1], "--sample_guide_scale", "5"])],
                         ids=["s2v", "animate"])
def test_per_block_cfg_gives_the_batched_frames_with_audio_and_face_inputs(files, tmp_path, task, extra):
    """Each CFG branch takes its own rows of the S2V audio tokens / Animate face tokens through the blocks (Animate
    runs without CFG by default: guide 5 here)."""
    import wanlite
    from wanlite.cli import build_parser, request_from_args

    frames = {}
    for cfg in ("batched", "per_block"):
        args = build_parser().parse_args(["generate", *_flags(files, task, extra), "--cfg", cfg, "--save_file",
                                          str(tmp_path / f"{cfg}.mp4")])
        result = wanlite.generate(request_from_args(args), progress=False)
        assert result.job.cfg == cfg
        frames[cfg] = result.frames.astype(int)
    diff = np.abs(frames["batched"] - frames["per_block"])
    # S2V's audio injector runs its GEMMs on half the rows, which rounds a few values differently
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
