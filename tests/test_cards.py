"""The cards people own: attention kernels (and, as issue 35 lands, the GPU table, fp16, per-block CFG, compile)."""
import importlib.util

import pytest
import torch

import wanlite
from wanlite.cli import main
from wanlite.errors import WanliteError
from wanlite.models.attention import BACKENDS, attention, set_backend
from wanlite.pipelines.request import Request
from wanlite.tiny import checkpoint_dir

TINY = dict(task="tiny-t2v", prompt="a red square", ckpt_dir=checkpoint_dir("tiny-t2v"), dtype="fp32")


def test_auto_attention_is_sdpa_and_the_job_records_it():
    assert wanlite.resolve(Request(**TINY)).attention == "sdpa"
    assert wanlite.resolve(Request(**TINY, attention="sdpa")).attention == "sdpa"


@pytest.mark.parametrize("name,package", [("flash", "flash_attn"), ("sage", "sageattention")])
def test_a_missing_attention_package_is_one_line(name, package, capsys):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed here")
    with pytest.raises(WanliteError, match=f"--attention {name} needs the .* package, which is not installed"):
        wanlite.resolve(Request(**TINY, attention=name))
    code = main(["plan", "--task", "tiny-t2v", "--ckpt_dir", str(checkpoint_dir("tiny-t2v")), "--attention", name])
    assert code == 2 and "pip install" in capsys.readouterr().err


def test_a_gpu_kernel_on_the_cpu_is_refused(monkeypatch):
    import wanlite.pipelines.resolve as resolve_module

    monkeypatch.setattr(resolve_module, "available_backends", lambda: list(BACKENDS))  # as if installed
    with pytest.raises(WanliteError, match="--attention flash runs on a CUDA GPU only"):
        wanlite.resolve(Request(**TINY, attention="flash", device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn and SageAttention run on a CUDA GPU")
@pytest.mark.parametrize("name,package", [("flash", "flash_attn"), ("sage", "sageattention")])
def test_fast_attention_kernels_match_sdpa(name, package):
    if not importlib.util.find_spec(package):
        pytest.skip(f"{package} is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 12, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    set_backend("sdpa")
    want = attention(q, k, v).float()
    set_backend(name)
    try:
        got = attention(q, k, v).float()
    finally:
        set_backend("sdpa")
    snr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean())
    assert snr >= (40 if name == "flash" else 25)  # sage quantizes Q and K to int8


def _plan(capsys, *flags) -> dict:
    import json

    assert main(["plan", *flags, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["job"]


@pytest.mark.parametrize("name", ["T4", "Tesla T4", "t4"])
def test_plan_for_a_named_card_uses_its_figures(capsys, name):
    job = _plan(capsys, "--task", "ti2v-5B", "--gpu", name, "--ram", "12.7")
    assert job["machine"].startswith("T4, 16 GB VRAM, 13 GB RAM, PCIe 12 GB/s")
    assert job["dtype"] == "fp16"  # Turing has no bf16 units
    assert job["weights"]["quant"] != "fp8"  # nor fp8 ones


def test_cards_are_found_as_typed_or_as_the_driver_names_them(capsys):
    from wanlite.planner.gpus import find_card

    assert find_card("NVIDIA GeForce RTX 3060").name == find_card("3060").name == "RTX 3060"
    assert find_card("RTX 4060 Laptop GPU") is None and find_card("rtx 4060 laptop").name == "RTX 4060 Laptop"
    job = _plan(capsys, "--task", "t2v-A14B", "--gpu", "4090")
    assert job["machine"].startswith("RTX 4090, 24 GB") and job["dtype"] == "bf16" and job["weights"]["quant"] == "fp8"
    assert main(["plan", "--task", "t2v-A14B", "--gpu", "Voodoo 3"]) == 2
    assert "is not in wanlite's table; known: GTX 1070" in capsys.readouterr().err


def test_the_notebook_profiles_plan_their_t4(capsys):
    colab = _plan(capsys, "--task", "ti2v-5B", "--profile", "colab-t4")
    kaggle = _plan(capsys, "--task", "ti2v-5B", "--profile", "kaggle-t4")
    assert colab["machine"].startswith("T4, 16 GB VRAM, 13 GB RAM") and kaggle["machine"].startswith("T4, 16 GB VRAM, 29")
    assert colab["dtype"] == kaggle["dtype"] == "fp16"


def test_the_plan_predicts_the_whole_clip_and_warns_past_an_hour(capsys):
    job = _plan(capsys, "--task", "t2v-A14B", "--gpu", "RTX 3060")
    p, steps = job["predicted"], job["settings"]["steps"]
    assert p["total_s"] > steps * p["s_per_step"]  # + loading + decode
    assert any("predicted to take about" in w and "--preset lightning" in w for w in job["warnings"])
    quick = _plan(capsys, "--task", "ti2v-5B", "--gpu", "4090", "--size", "704*1280", "--frame_num", "17")
    assert quick["predicted"]["total_s"] < 3600 and not any("predicted to take" in w for w in quick["warnings"])


@pytest.mark.parametrize("task,floor", [("tiny-t2v", 52), ("tiny-ti2v", 47)])
def test_fp16_matches_fp32_on_the_bundled_models(task, floor):
    """Measured 59.5 / 52.6 dB (bf16: 46.9 / 31.5 dB): the norms, modulation and residual stream stay fp32."""
    import numpy as np

    frames = {}
    for dtype in ("fp32", "fp16"):
        with wanlite.load(task=task, ckpt_dir=checkpoint_dir(task), dtype=dtype, progress=False) as pipe:
            video = pipe.generate("a red square moving right", seed=1, steps=10, save=False)
        frames[dtype] = video.frames.astype(np.float64)
    mse = ((frames["fp16"] - frames["fp32"]) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) >= floor


def test_an_overflow_stops_the_run_before_any_frame_is_written(tmp_path, monkeypatch):
    from wanlite.errors import NumericalOverflow
    from wanlite.models.dit import WanDiT

    real = WanDiT.forward

    def overflowing(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return out * float("inf")

    monkeypatch.setattr(WanDiT, "forward", overflowing)
    with pytest.raises(NumericalOverflow, match="output is not finite at step 1 .*--dtype bf16"):
        wanlite.generate(task="tiny-t2v", ckpt_dir=checkpoint_dir("tiny-t2v"), prompt="x", dtype="fp16", steps=3,
                         save_file=tmp_path / "v.mp4", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task", ["t2v-A14B", "ti2v-5B"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_per_block_cfg_gives_the_batched_output(tmp_path, task, chunk):
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import expert_components, load_dit
    from wanlite.specs import TINY_DIT_SPECS
    from wanlite.testing.fixtures import write_fixture

    model = load_dit(next(iter(expert_components(discover(write_fixture(task, "official", tmp_path)), task).values())),
                     task, torch.float32)
    spec = TINY_DIT_SPECS[task]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, spec.in_dim, 2, 8, 8, generator=g), torch.tensor([900.0, 900.0])
    context = [torch.randn(7, spec.text_dim, generator=g), torch.randn(11, spec.text_dim, generator=g)]
    model.chunk_tokens = chunk
    with torch.no_grad():
        batched = model(x, t, context)
        model.rows_apart = True
        apart = model(x, t, context)
    assert torch.equal(batched, apart)


@pytest.mark.parametrize("cache", ["off", "fast"])
def test_per_block_cfg_videos_equal_batched_ones(tmp_path, cache):
    """Also with a step cache, which keeps block inputs that per-block CFG would otherwise overwrite."""
    frames = {}
    for cfg in ("batched", "per_block"):
        result = wanlite.generate(**TINY, seed=2, steps=6, cfg=cfg, cache=cache, save_file=tmp_path / f"{cfg}.mp4",
                                  progress=False)
        assert result.job.cfg == cfg
        frames[cfg] = result.frames
    assert (frames["batched"] == frames["per_block"]).all()


def test_the_planner_runs_cfg_per_block_where_the_batched_pair_does_not_fit():
    from wanlite.planner import Workload, hypothetical, make_plan
    from wanlite.planner.plan import PRECISION_ORDER, VRAM_MARGIN, _candidates

    work, hw = Workload("t2v-A14B", 1280, 720, 81, 40), hypothetical(8, 32)  # A14B at 720p on an 8 GB card
    assert not _candidates(work, hw, PRECISION_ORDER, hw.vram_free * VRAM_MARGIN, 2)  # batched: nothing fits
    plan = make_plan(work, hw)
    assert plan.cfg == "per_block" and any(r.startswith("CFG per block") for r in plan.reasons)
    assert plan.predicted.peak_vram_gb <= 8
    assert make_plan(work, hypothetical(24, 64)).cfg == "batched"  # when the pair fits, it runs as a batch


def test_compiled_blocks_give_the_eager_frames(tmp_path):
    """torch.compile of each block (Inductor on the CPU): the frames of the eager run, within GEMM rounding."""
    import numpy as np

    frames = {}
    for compiled in (False, True):
        result = wanlite.generate(**TINY, seed=3, steps=3, compile=compiled, save_file=tmp_path / f"{compiled}.mp4",
                                  progress=False)
        assert result.job.compile == compiled
        frames[compiled] = result.frames.astype(int)
    diff = np.abs(frames[True] - frames[False])
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(WanliteError, match="--compile on the CPU needs a C\\+\\+ compiler"):
        wanlite.resolve(Request(**TINY, compile=True, device="cpu"))
