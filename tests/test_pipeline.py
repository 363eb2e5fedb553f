"""Load once, generate many: the Pipeline, its keyword names, the prompt queue and the progress display."""
import gc
import io
import json

import numpy as np
import pytest

import wanlite
from wanlite.cli import main
from wanlite.errors import WanliteError
from wanlite.offload.memory import return_large_frees_to_os, rss_bytes
from wanlite.pipelines.progress import Eta, ProgressDisplay
from wanlite.pipelines.request import Request, request_with
from wanlite.pipelines.video_io import read_mp4_metadata
from wanlite.tiny import checkpoint_dir
from wanlite.tiny.lora import LORA_DIR

TINY = dict(task="tiny-t2v", ckpt_dir=checkpoint_dir("tiny-t2v"), dtype="fp32", steps=6)
LORAS = dict(lora_high=str(LORA_DIR / "high_noise_model.safetensors"),
             lora_low=str(LORA_DIR / "low_noise_model.safetensors"))


def test_two_generations_load_each_model_once_and_match_one_shot_frames(tmp_path):
    one_shot = wanlite.generate(prompt="a red square moving right", seed=3, save_file=tmp_path / "one.mp4",
                                progress=False, **TINY)
    out = tmp_path / "outputs"
    with wanlite.load(output_dir=out, progress=False, **TINY) as pipe:
        first = pipe.generate("a blue circle moving up", seed=1, save=False)
        second = pipe.generate(prompt="a red square moving right", seed=3, output=None)
        assert dict(pipe.loads) == {"text encoder": 1, "transformer (high_noise)": 1,
                                    "transformer (low_noise)": 1, "VAE": 1}
    assert np.array_equal(second.frames, one_shot.frames)  # bit for bit
    assert not np.array_equal(first.frames, second.frames)
    assert first.path is None and second.path is None and not out.exists()  # nothing written
    assert pipe.components.experts is None and pipe.components.text is None  # close() freed them


def test_an_option_that_changes_the_plan_reloads_only_that_component_and_says_so(tmp_path):
    events = []
    with wanlite.load(progress=events.append, **TINY) as pipe:
        pipe.generate("a blue circle moving up on a black background", seed=1, save=False)
        with_lora = pipe.generate("a blue circle moving up on a black background", seed=1, save=False, **LORAS)
        again = pipe.generate("a blue circle moving up on a black background", seed=1, save=False, **LORAS)
        loads = dict(pipe.loads)
    reloads = [e for e in events if e["event"] == "reload"]
    assert [(e["what"], e["changed"]) for e in reloads] == [("transformer", ["LoRAs"])]
    assert "loading the transformer again: its LoRAs changed" in reloads[0]["message"]
    assert loads == {"text encoder": 1, "transformer (high_noise)": 2, "transformer (low_noise)": 2, "VAE": 1}
    one_shot = wanlite.generate(prompt="a blue circle moving up on a black background", seed=1, progress=False,
                                save_file=tmp_path / "l.mp4", **LORAS, **TINY)
    assert np.array_equal(with_lora.frames, one_shot.frames) and np.array_equal(again.frames, one_shot.frames)


@pytest.mark.parametrize("ram_mode", ["pinned", "mmap", "disk"])
def test_block_offload_stays_open_between_generations(tmp_path, ram_mode):
    """The engine parks (device buffers freed, host copies kept) and the next generation streams from them; the
    step cache starts fresh each time."""
    kw = dict(TINY, steps=12, offload="block", ram_mode=ram_mode, resident_blocks=1, prefetch=1, cache="turbo",
              offload_cache=tmp_path / "cache")
    one_shot = wanlite.generate(prompt="a red square", seed=2, save_file=tmp_path / "one.mp4", progress=False, **kw)
    with wanlite.load(progress=False, **kw) as pipe:
        first = pipe.generate("a red square", seed=2, save=False)
        second = pipe.generate("a red square", seed=2, save=False)
        assert pipe.job.keep.transformer == "host" and pipe.loads["transformer (low_noise)"] == 1
    assert np.array_equal(first.frames, one_shot.frames) and np.array_equal(second.frames, one_shot.frames)
    assert first.cache == second.cache == one_shot.cache and first.cache["skipped_fraction"] > 0


def test_an_output_that_is_not_an_mp4_is_refused_before_any_work(tmp_path):
    with wanlite.load(progress=False, **TINY) as pipe:
        with pytest.raises(WanliteError, match="output='.*clip.avi' must end in .mp4"):
            pipe.generate("x", output=tmp_path / "clip.avi")
        assert not pipe.loads and not list(tmp_path.iterdir())


def test_memory_stays_flat_over_five_generations():
    with wanlite.load(progress=False, **TINY) as pipe:
        sizes = []
        for seed in range(5):
            pipe.generate("a green triangle moving left", seed=seed, save=False)
            gc.collect()
            return_large_frees_to_os()
            sizes.append(rss_bytes())
    assert sizes[-1] <= 1.05 * sizes[0], [f"{s / 1e6:.0f} MB" for s in sizes]


def test_the_pipeline_keeps_what_fits_and_says_where():
    job = wanlite.load(progress=False, **TINY).job
    assert (job.keep.text_encoder, job.keep.transformer, job.keep.vae) == ("device", "device", "device")  # a CPU
    assert any(r.startswith("between generations the transformer waits on the device") for r in job.reasons)
    one_shot = wanlite.resolve(Request(prompt="x", **TINY))
    assert (one_shot.keep.text_encoder, one_shot.keep.transformer, one_shot.keep.vae) == ("none",) * 3


def test_keep_plan_follows_the_memory():
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from wanlite.offload import OffloadConfig
    from wanlite.pipelines.resolve import keep_plan
    from wanlite.planner.plan import Prediction
    from wanlite.planner.probe import Hardware

    gb = 10**9
    t5 = SimpleNamespace(t5=SimpleNamespace(files=[Path(__file__)]))  # a small file stands in for umT5
    gpu = Hardware("RTX", vram_total=24 * gb, vram_free=23 * gb, ram_total=64 * gb, ram_available=60 * gb)
    fits = Prediction(20, 10, 5, 0.5, 4, 6, 30, 0, 1.0)
    tight = Prediction(20, 18, 5, 0.5, 6, 6, 30, 0, 1.0)
    cuda = torch.device("cuda")
    assert keep_plan(cuda, gpu, OffloadConfig("none"), 10 * gb, t5, fits, False).transformer == "device"
    assert keep_plan(cuda, gpu, OffloadConfig("none"), 18 * gb, t5, tight, False).transformer == "host"
    small = Hardware("RTX", vram_total=12 * gb, vram_free=11 * gb, ram_total=32 * gb, ram_available=28 * gb)
    kept = keep_plan(cuda, small, OffloadConfig("model"), 30 * gb, t5, tight, False)
    assert (kept.transformer, kept.text_encoder, kept.vae) == ("none", "host", "host")  # 30 GB of experts: reload
    block = keep_plan(cuda, small, OffloadConfig("block", ram_mode="mmap"), 30 * gb, t5, tight, False)
    assert block.transformer == "host"  # the engine stays open; its host copies are mapped files


def test_keyword_names_are_the_same_in_the_api_and_on_the_command_line():
    base = Request(task="tiny-t2v", prompt="")
    r = request_with(base, base_seed=5, frame_num=9, size="64*48", guide_scale=3, lora="a.safetensors:0.5",
                     image="x.png")
    assert (r.seed, r.frames, r.size, r.guide_scale, r.lora, str(r.image)) == (
        5, 9, (64, 48), (3.0, 3.0), ("a.safetensors:0.5",), "x.png")
    assert request_with(base, seed=5, frames=9) == request_with(base, base_seed=5, frame_num=9)
    with pytest.raises(WanliteError, match="unknown option 'seeds'; did you mean seed"):
        request_with(base, seeds=3)

    from wanlite.cli import build_parser

    parser = build_parser()
    new = parser.parse_args(["generate", "--seed", "5", "--frames", "9", "--steps", "4", "--output_dir", "o"])
    old = parser.parse_args(["generate", "--base_seed", "5", "--frame_num", "9", "--sample_steps", "4",
                             "--output-dir", "o"])
    assert vars(new) == vars(old)
    demo = parser.parse_args(["demo", "--base_seed", "2", "--frame_num", "9"])
    assert (demo.seed, demo.frames) == (2, 9)


def test_a_jsonl_queue_runs_every_good_item_once_loaded_and_reports_the_bad_one(tmp_path, capsys):
    queue = tmp_path / "queue.jsonl"
    lines = [{"prompt": "a red square moving right", "seed": 1},
             {"prompt": "a blue circle moving up", "seed": 2, "frames": 9},
             {"prompt": "a green triangle", "size": "63*64"},  # not a multiple of 16: this item fails
             {"prompt": "a yellow square moving down", "base_seed": 4}]
    queue.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n", encoding="utf-8")
    out = tmp_path / "videos"
    code = main(["generate", "--task", "tiny-t2v", "--ckpt_dir", str(checkpoint_dir("tiny-t2v")), "--dtype", "fp32",
                 "--steps", "4", "--prompt_file", str(queue), "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert code == 2  # some items were bad input
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 3
    seeds = sorted(read_mp4_metadata(v)["job"]["settings"]["seed"] for v in videos)
    assert seeds == [1, 2, 4]
    frames = {read_mp4_metadata(v)["job"]["settings"]["frames"] for v in videos}
    assert frames == {9, 17}
    assert "[3/5] line 3: error: --size 63*64" in text and "[5/5] line 5: error: not JSON" in text
    assert "3 of 5 videos made" in text and "transformer (high_noise) x1" in text and "text encoder x1" in text


def test_num_videos_makes_consecutive_seeds_of_each_prompt(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na red square moving right\n\na blue circle moving up\n", encoding="utf-8")
    out = tmp_path / "videos"
    code = main(["generate", "--task", "tiny-t2v", "--ckpt_dir", str(checkpoint_dir("tiny-t2v")), "--dtype", "fp32",
                 "--steps", "3", "--prompt_file", str(prompts), "--num_videos", "2", "--seed", "7",
                 "--output_dir", str(out)])
    assert code == 0
    made = sorted((m["job"]["settings"]["prompt"], m["job"]["settings"]["seed"])
                  for m in (read_mp4_metadata(v) for v in out.glob("*.mp4")))
    assert made == [("a blue circle moving up", 7), ("a blue circle moving up", 8),
                    ("a red square moving right", 7), ("a red square moving right", 8)]
    assert "4 of 4 videos made" in capsys.readouterr().out


def test_a_queue_refuses_one_save_file(tmp_path, capsys):
    code = main(["generate", "--task", "tiny-t2v", "--prompt", "x", "--num_videos", "2",
                 "--save_file", str(tmp_path / "a.mp4")])
    assert code == 2
    assert "--save_file names one video" in capsys.readouterr().err


class NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_in_a_notebook_is_one_updating_line_per_stage():
    stream = NotATerminal()
    with wanlite.load(progress=False, **{**TINY, "steps": 40}) as pipe:
        with ProgressDisplay(stream) as display:
            pipe.generate("a red square moving right", seed=0, save=False, progress=display)
    text = stream.getvalue()
    lines = text.split("\n")
    assert len(lines) < 20, text  # 40 steps, yet a dozen lines: stages, loads, the plan
    steps = [line for line in lines if line.startswith("\rstep ")]
    shown = [line.split("\r")[-1] for line in steps]  # what stays on screen of each updating line
    assert sum(line.count("\r") for line in steps) == 40
    assert [s.split("  ")[:2] for s in shown] == [["step 17/40", "high noise 17/17"], ["step 40/40", "low noise 23/23"]]
    assert "loaded transformer (low noise)" in lines[lines.index(steps[0]) + 1]  # the switch, between them
    assert lines[-2].startswith("done in 0:")


def test_the_eta_counts_the_steps_left_the_expert_still_to_load_and_the_decode():
    eta = Eta()
    eta.on_event({"event": "loaded", "what": "transformer (high noise)", "bytes": 1, "seconds": 30.0})
    eta.on_event({"event": "stage", "name": "denoise", "schedule": ["high_noise"] * 4 + ["low_noise"] * 6,
                  "decode_steps": 2.5, "switch_loads": True})
    eta.on_event({"event": "expert", "role": "high_noise", "step": 0})
    step = {"event": "step", "i": 2, "total": 10, "role": "high_noise", "role_i": 2, "role_total": 4,
            "elapsed": 20.0}
    assert eta.after(step) == (10.0, 10.0 * (8 + 2.5) + 30.0)  # the low-noise expert loads at the switch
    eta.on_event({"event": "loaded", "what": "transformer (low noise)", "bytes": 1, "seconds": 28.0})
    eta.on_event({"event": "expert", "role": "low_noise", "step": 4})
    later = {**step, "i": 5, "elapsed": 50.0 + 28.0, "role": "low_noise", "role_i": 1, "role_total": 6}
    assert eta.after(later) == (10.0, 10.0 * (5 + 2.5))  # the load is not a step's time


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_draws_bars_and_keeps_the_stage_lines():
    stream = Terminal()
    with ProgressDisplay(stream) as display:
        display({"event": "plan", "summary": "job: bf16 weights", "reasons": []})
        display({"event": "stage", "name": "encode text"})
        display({"event": "load", "what": "text encoder", "done": 5 * 10**8, "total": 10**9, "seconds": 1.0})
        display({"event": "loaded", "what": "text encoder", "bytes": 10**9, "seconds": 2.0})
        display({"event": "stage", "name": "denoise", "schedule": ["main"] * 2, "decode_steps": 1.0,
                 "switch_loads": False})
        for i in (1, 2):
            display({"event": "step", "i": i, "total": 2, "role": "main", "role_i": i, "role_total": 2,
                     "elapsed": 3.0 * i})
        display({"event": "done", "path": None, "telemetry": {}, "seconds": 75.0})
    text = stream.getvalue()
    for line in ("job: bf16 weights", "encode text ...", "loaded text encoder: 1.00 GB in 2.0 s (500 MB/s)",
                 "denoise ...", "done in 1:15"):
        assert line in text
