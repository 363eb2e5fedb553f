"""Block offload on CPU: outputs equal the plain model's for every k, d, RAM mode and weight format; host RAM
holds one expert at a time in mmap/disk mode; bad input and fallbacks."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wanlite import generate
from wanlite.cli import main
from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import DiTPieces, expert_components, load_dit
from wanlite.models.dit import WanDiT
from wanlite.offload import OffloadConfig, attach_offload, open_offloaded
from wanlite.offload import stores
from wanlite.offload.slabs import layout_of, pin_or_plain
from wanlite.pipelines.video_io import read_mp4_metadata
from wanlite.quant import Fp8WeightConfig, GGUFWeightConfig, Int8WeightConfig, parse_quant, quantize_
from wanlite.specs import TINY_DIT_SPECS
from wanlite.testing.fixtures import write_fixture

TASK = "t2v-A14B"
SCHEDULE = ["high_noise"] * 2 + ["low_noise"] * 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return discover(write_fixture(TASK, "official", tmp_path_factory.mktemp("offload") / "ck"))


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    spec = TINY_DIT_SPECS[TASK]
    return torch.randn(2, 16, 2, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 7, spec.text_dim)


def run_schedule(engine, inputs, schedule=SCHEDULE):
    x, t, ctx = inputs
    engine.set_schedule(schedule)
    with torch.no_grad():
        outs = [engine.activate(role)(x, t, ctx) for role in schedule]
    return outs, engine.finish()


def reference(models, inputs, schedule=SCHEDULE):
    x, t, ctx = inputs
    with torch.no_grad():
        return [models[role](x, t, ctx) for role in schedule]


def five_block_experts():
    torch.manual_seed(1)
    spec = TINY_DIT_SPECS[TASK].__class__(**{**TINY_DIT_SPECS[TASK].__dict__, "num_layers": 5})
    return {role: WanDiT(spec).eval() for role in ("high_noise", "low_noise")}


@pytest.mark.parametrize("resident", [0, 2, 5])
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_block_offload_equals_plain_forward_for_every_k_and_d(inputs, resident, prefetch):
    models = five_block_experts()
    want = reference(models, inputs)
    engine = attach_offload(copy.deepcopy(models), OffloadConfig("block", resident, prefetch), "cpu",
                            copy_on_host=True)  # the device path's copies, through the ring
    got, telemetry = run_schedule(engine, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # every forward moves the streamed blocks once (CFG is one batch); each activation moves pre+head+residents
    block = sum(t.nbytes for t in models["high_noise"].blocks[0].state_dict().values())
    assert telemetry.bytes_moved >= len(SCHEDULE) * (5 - resident) * block


def test_on_the_cpu_ram_slabs_are_used_in_place(inputs):
    models = five_block_experts()
    want = reference(models, inputs)
    engine = attach_offload(copy.deepcopy(models), OffloadConfig("block", 1, 2), "cpu")
    got, telemetry = run_schedule(engine, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert telemetry.bytes_moved == 0  # host memory is the device's: nothing to copy


@pytest.mark.parametrize("config", [Fp8WeightConfig(), GGUFWeightConfig("Q4_K"), GGUFWeightConfig("Q8_0"),
                                    Int8WeightConfig("torchao"), Int8WeightConfig("quanto")],
                         ids=lambda c: c.name)
def test_attach_offload_streams_every_weight_format(inputs, config):
    def build():  # deterministic, so two builds are identical (quanto's tensors cannot be deep-copied)
        return {role: quantize_(m.to(torch.bfloat16), config) for role, m in five_block_experts().items()}

    want = reference(build(), inputs)
    engine = attach_offload(build(), OffloadConfig("block", 1, 2), "cpu", copy_on_host=True)
    got, _ = run_schedule(engine, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("ram_mode", ["pinned", "mmap", "disk"])
@pytest.mark.parametrize("quant", ["auto", "fp8", "gguf-q4_k", "int8"])
def test_ram_modes_equal_the_loaded_model(ckpt, inputs, tmp_path, ram_mode, quant):
    if ram_mode == "disk" and quant == "int8":
        pytest.skip("torchao int8 is a tensor subclass: disk mode refuses it (tested below)")
    config = parse_quant(quant)
    comps = expert_components(ckpt, TASK)
    models = {role: load_dit(comp, TASK, torch.bfloat16, config) for role, comp in comps.items()}
    want = reference(models, inputs)
    for resident, prefetch in ((0, 1), (1, 2)):
        engine = open_offloaded(comps, TASK, torch.bfloat16, config,
                                OffloadConfig("block", resident, prefetch, ram_mode, cache_dir=tmp_path), "cpu",
                                copy_on_host=True)
        got, _ = run_schedule(engine, inputs)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (resident, prefetch)


@pytest.mark.parametrize("ram_mode", ["mmap", "disk"])
def test_only_one_expert_is_in_memory_at_a_time(ckpt, inputs, tmp_path, monkeypatch, ram_mode):
    """The low-noise expert is first read during the high-noise expert's last forward (prefetch), never
    before; the inactive expert's weights are all on meta; the high-noise expert is never read after."""
    reads = []
    forward = {"n": 0}
    original = DiTPieces.load

    def recording_load(self, piece):
        reads.append((self.role, piece, forward["n"]))
        return original(self, piece)

    monkeypatch.setattr(DiTPieces, "load", recording_load)
    monkeypatch.setattr(DiTPieces, "role", property(lambda self: "high_noise" if "high" in str(self.where).lower()
                                                    else "low_noise"), raising=False)
    comps = expert_components(ckpt, TASK)
    config = OffloadConfig("block", 1, 2, ram_mode, cache_dir=tmp_path)
    open_offloaded(comps, TASK, torch.bfloat16, None, config, "cpu").finish()  # disk: writes the cache
    reads.clear()
    engine = open_offloaded(comps, TASK, torch.bfloat16, None, config, "cpu")
    engine.set_schedule(SCHEDULE)
    x, t, ctx = inputs
    with torch.no_grad():
        for n, role in enumerate(SCHEDULE):
            forward["n"] = n
            engine.activate(role)(x, t, ctx)
            other = engine.experts["low_noise" if role == "high_noise" else "high_noise"].model
            assert all(p.is_meta for p in other.parameters()), f"the inactive expert holds data after {n}"
    engine.finish()
    if ram_mode == "disk":
        assert reads == []  # the cache is complete: the checkpoint is not read again
        return
    last_high = SCHEDULE.index("low_noise") - 1
    assert all(n >= last_high for role, _, n in reads if role == "low_noise")
    assert all(n <= last_high for role, _, n in reads if role == "high_noise")


def test_disk_cache_is_rebuilt_when_the_checkpoint_changes(tmp_path, inputs):
    ck = discover(write_fixture(TASK, "official", tmp_path / "ck"))
    comps = expert_components(ck, TASK)
    config = OffloadConfig("block", 0, 1, "disk", cache_dir=tmp_path / "cache")
    events = []
    open_offloaded(comps, TASK, torch.bfloat16, None, config, "cpu", events.append).finish()
    written = [e for e in events if e.get("name", "").startswith("write offload cache")]
    assert len(written) == 2
    events.clear()
    open_offloaded(comps, TASK, torch.bfloat16, None, config, "cpu", events.append).finish()
    assert not any(e.get("name", "").startswith("write offload cache") for e in events)  # reused

    # other weights under the same name: the manifest hash differs, so the cache is rebuilt, never used
    write_fixture(TASK, "official", tmp_path / "ck", seed=5)
    models = {role: load_dit(comp, TASK, torch.bfloat16) for role, comp in comps.items()}
    engine = open_offloaded(comps, TASK, torch.bfloat16, None, config, "cpu", events.append)
    assert sum(e.get("name", "").startswith("write offload cache") for e in events) == 2
    got, _ = run_schedule(engine, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, reference(models, inputs)))

    # a truncated piece file is noticed by its size and rebuilt too
    folder = next(p for p in (tmp_path / "cache").iterdir() if "high_noise" in p.name)
    victim = folder / "block_000.bin"
    victim.write_bytes(victim.read_bytes()[:100])
    events.clear()
    open_offloaded(comps, TASK, torch.bfloat16, None, config, "cpu", events.append).finish()
    assert sum(e.get("name", "").startswith("write offload cache") for e in events) == 1


def test_mmap_never_requantizes_per_step(ckpt, tmp_path):
    """Quantizing on load under mmap would redo it for every block of every step: resolve picks disk mode, which
    converts once, says why, and the engine runs the mode it is given."""
    from wanlite.pipelines.request import Request
    from wanlite.pipelines.resolve import resolve

    job = resolve(Request(task=TASK, prompt="a", ckpt_dir=ckpt.root, size=(64, 32), frames=5, steps=2, quant="fp8",
                          offload="block", ram_mode="mmap", offload_cache=tmp_path, device="cpu"))
    assert job.offload.ram_mode == "disk"
    assert any("re-quantize every block" in w for w in job.warnings)
    events = []
    engine = open_offloaded(expert_components(ckpt, TASK), TASK, torch.bfloat16, Fp8WeightConfig(), job.offload,
                            "cpu", events.append)
    assert any(e.get("name", "").startswith("write offload cache") for e in events)
    engine.finish()


def test_disk_mode_refuses_tensor_subclass_weights_with_a_clear_message(ckpt, tmp_path):
    comps = expert_components(ckpt, TASK)
    with pytest.raises(WanliteError, match="--ram_mode mmap"):
        open_offloaded(comps, TASK, torch.bfloat16, Int8WeightConfig("torchao"),
                       OffloadConfig("block", 0, 1, "disk", cache_dir=tmp_path), "cpu")


def test_weights_with_state_outside_their_data_are_refused():
    class StatefulParam(nn.Parameter):  # like bitsandbytes' Int8Params: extra state, no __tensor_flatten__
        pass

    lin = nn.Linear(4, 4)
    lin.weight = StatefulParam(lin.weight.detach(), requires_grad=False)
    with pytest.raises(WanliteError, match="cannot be streamed block by block"):
        layout_of(lin)


def test_pinning_refused_by_the_os_falls_back_to_pageable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []

    def refuse(*args, pin_memory=False, **kw):
        calls.append(pin_memory)
        if pin_memory:
            raise RuntimeError("cudaHostAlloc failed: out of memory")
        return torch.zeros(*args, **kw)

    monkeypatch.setattr(torch, "empty", refuse)
    budget = stores.PinBudget(limit=1 << 30)
    a, b = budget.allocate(64), budget.allocate(64)
    assert a.numel() == b.numel() == 64 and budget.pinned == 0 and budget.pageable == 128
    assert calls == [True, False, False]  # refused once, then it stops asking
    assert pin_or_plain(8, pin=False)[1] is False


def test_partial_pinning_stops_at_the_cap(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(stores, "pin_or_plain", lambda n, pin: (torch.empty(n, dtype=torch.uint8), pin))
    budget = stores.PinBudget(limit=100)
    for _ in range(3):
        budget.allocate(40)
    assert budget.pinned == 80 and budget.pageable == 40


def test_not_enough_ram_for_pinned_falls_back_to_mmap(ckpt, inputs, monkeypatch):
    """Decided by resolve (the job says mmap and why), not by the engine."""
    import wanlite.offload.memory
    import wanlite.pipelines.resolve as resolve_module
    from wanlite.pipelines.request import Request

    monkeypatch.setattr(wanlite.offload.memory, "available_ram", lambda: 1000)  # the machine as resolve measures it
    job = resolve_module.resolve(Request(task=TASK, prompt="a", ckpt_dir=ckpt.root, size=(64, 32), frames=5,
                                         steps=2, offload="block", ram_mode="pinned", device="cpu"))
    assert job.offload.ram_mode == "mmap"
    assert any("using --ram_mode mmap" in w for w in job.warnings)


def test_disk_mode_without_space_says_so(ckpt, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(WanliteError, match="--ram_mode disk needs up to .* GB for its cache"):
        open_offloaded(expert_components(ckpt, TASK), TASK, torch.bfloat16, None,
                       OffloadConfig("block", 0, 1, "disk", cache_dir=tmp_path / "c"), "cpu")


@pytest.mark.parametrize("mode,ram_mode", [("none", "pinned"), ("block", "pinned"), ("block", "mmap"),
                                           ("block", "disk")])
def test_generate_with_offload_matches_and_reports_telemetry(ckpt, tmp_path, mode, ram_mode):
    args = dict(task=TASK, prompt="a red square", ckpt_dir=ckpt.root, size=(64, 32), frames=5, steps=4, seed=3,
                dtype="fp32")
    plain = generate(**args, save_file=tmp_path / "plain.mp4", offload="model")
    result = generate(**args, save_file=tmp_path / "off.mp4", offload=mode, ram_mode=ram_mode, resident_blocks=1,
                      prefetch=1, offload_cache=tmp_path / "cache")
    assert np.array_equal(plain.frames, result.frames)
    meta = read_mp4_metadata(result.path)
    assert OffloadConfig(**meta["job"]["offload"]).describe().startswith(mode)
    assert meta["telemetry"]["peak_rss_gb"] > 0
    if (mode, ram_mode) != ("block", "pinned"):  # RAM slabs on a CPU "device" are used in place
        assert meta["telemetry"]["bytes_moved_gb"] > 0


def test_cli_offload_flags_and_telemetry_line(ckpt, tmp_path, capsys):
    rc = main(["generate", "--task", TASK, "--ckpt_dir", str(ckpt.root), "--prompt", "a red square",
               "--size", "64*32", "--frame_num", "5", "--sample_steps", "2", "--offload", "block",
               "--resident_blocks", "1", "--prefetch", "2", "--ram_mode", "mmap", "--save_file",
               str(tmp_path / "o.mp4"), "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "GB of weights moved to the device" in out and "peak RSS" in out
    assert OffloadConfig(**read_mp4_metadata(tmp_path / "o.mp4")["job"]["offload"]).describe() == \
        "block (k=1, d=2, ram=mmap)"
    rc = main(["generate", "--task", TASK, "--ckpt_dir", str(ckpt.root), "--prompt", "x", "--resident_blocks",
               "-1", "--offload", "block"])
    assert rc == 2 and "--resident_blocks" in capsys.readouterr().err


def test_back_to_back_generations_do_not_grow_memory(ckpt, tmp_path):
    from wanlite.offload.memory import rss_bytes

    args = dict(task=TASK, prompt="a red square", ckpt_dir=ckpt.root, size=(64, 32), frames=5, steps=2, seed=3,
                dtype="fp32", offload="block", ram_mode="pinned", save_file=tmp_path / "r.mp4", overwrite=True)
    rss = []
    for _ in range(5):
        generate(**args)
        rss.append(rss_bytes())
    growth = rss[-1] - rss[1]  # the first run pays one-time imports and allocator warm-up
    assert growth < 16 * 2**20, [r / 2**20 for r in rss]
    assert json.loads(json.dumps(read_mp4_metadata(tmp_path / "r.mp4")["telemetry"]))
    assert Path(tmp_path / "r.mp4").is_file()


def test_gpu_validation_dry_run_runs_on_cpu(tmp_path):
    """bench/gpu_validate.py --dry-run: the GPU validation's code at tiny sizes, offload through the emulator."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "dry.json"
    proc = subprocess.run([sys.executable, str(repo / "bench" / "gpu_validate.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU, dry run")
    assert [r["plan"]["offload"] for r in result["plans"]] == ["block"] * 4
    assert any(r["plan"]["cfg"] == "per_block" for r in result["plans"])  # A14B 720p on 8 GB
    assert all(r["telemetry"]["bytes_moved_gb"] > 0 for r in result["plans"])
    assert result["offload"][2]["telemetry"]["switch_stall_s"] >= 0 and result["ti2v"]["decode"]["frames_out"] > 1
    assert {r["ran"].split()[0] for r in result["gguf"]} == {"Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0"}


@pytest.mark.parametrize("kind", ["gguf", "comfy-fp8"])
@pytest.mark.parametrize("ram_mode", ["mmap", "disk"])
def test_prequantized_files_stream_as_stored(tmp_path, inputs, kind, ram_mode):
    """The files users have (city96 GGUF with mixed types, ComfyUI fp8_scaled) stream block by block as stored."""
    from wanlite.loading.checkpoints import with_components
    from wanlite.testing.fixtures import build_tiny_models
    from wanlite.testing.quant_files import write_comfy_fp8_scaled, write_gguf_with_gguf_py

    dits, _, _ = build_tiny_models(TASK, seed=2)
    files = {}
    for role, dit in dits.items():
        state = dit.state_dict()
        if kind == "gguf":
            files[f"{role}_model"] = write_gguf_with_gguf_py(
                state, tmp_path / f"{role}.gguf", "Q4_0", mixed={"blocks.1.ffn.0.weight": "Q8_0"})
        else:
            files[f"{role}_model"] = write_comfy_fp8_scaled(state, tmp_path / f"wan_{role}_fp8_scaled.safetensors")
    comps = expert_components(with_components(None, files), TASK)
    models = {role: load_dit(comp, TASK, torch.bfloat16) for role, comp in comps.items()}
    engine = open_offloaded(comps, TASK, torch.bfloat16, None,
                            OffloadConfig("block", 0, 1, ram_mode, cache_dir=tmp_path / "cache"), "cpu")
    got, telemetry = run_schedule(engine, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, reference(models, inputs)))
    stored = sum(Path(p).stat().st_size for comp in comps.values() for p in comp.files)
    assert telemetry.bytes_moved < 3 * stored  # quantized bytes crossed, not dequantized ones
