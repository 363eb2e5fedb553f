"""The planner: activation formulas against traced allocations, plans for described machines, profiles, the
CLI, and that `generate` applies a plan's choices."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from wanlite import generate
from wanlite.cache import PRESETS, DBCacheConfig, TaylorSeerConfig, apply_cache
from wanlite.cli import main
from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import discover
from wanlite.models.blocks import BlockInputs, WanBlock, keeps_fp32
from wanlite.models.dit import WanDiT
from wanlite.models.rope import rope_cos_sin
from wanlite.models.vae import WanVAE
from wanlite.offload import OffloadConfig
from wanlite.pipelines.video_io import read_mp4_metadata
from wanlite.planner import PROFILES_DIR, Workload, hypothetical, load_profile, make_plan, plan_to_toml, read_profile
from wanlite.planner.estimate import (cache_state_bytes, dit_activation_bytes, t5_activation_bytes,
                                      vae_decode_bytes)
from wanlite.planner.memtrace import LiveBytes
from wanlite.planner.probe import Hardware, load_or_probe, probe
from wanlite.specs import DIT_SPECS, TINY_DIT_SPECS, VAE_SPECS
from wanlite.testing.fixtures import write_fixture


def bf16_dit(spec):
    torch.manual_seed(0)
    model = WanDiT(spec).eval()
    for name, p in model.named_parameters():
        if not keeps_fp32(name):
            p.data = p.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("spec", [TINY_DIT_SPECS["t2v-A14B"],
                                  replace(DIT_SPECS["t2v-A14B"], dim=768, ffn_dim=2048, num_heads=6, num_layers=2,
                                          text_dim=TINY_DIT_SPECS["t2v-A14B"].text_dim)],
                         ids=["tiny", "mid"])
@pytest.mark.parametrize("chunk", [None, 512])
@pytest.mark.parametrize("rows_apart", [False, True], ids=["batched", "per-block-cfg"])
def test_dit_activation_formula_matches_traced_allocations(spec, chunk, rows_apart):
    """predicted / measured within 0.9-1.1 for a CFG batch at 2,400 tokens (the regime plans are made for)."""
    model = bf16_dit(spec)
    model.chunk_tokens, model.rows_apart = chunk, rows_apart
    x = torch.randn(2, spec.in_dim, 6, 40, 40)  # 6 * 20 * 20 = 2,400 tokens
    t = torch.full((2,), 900.0)
    context = [torch.randn(20, spec.text_dim), torch.randn(30, spec.text_dim)]
    with torch.no_grad(), LiveBytes() as traced:
        model(x, t, context)
    predicted = dit_activation_bytes(spec, 6 * 20 * 20, chunk, rows_apart=rows_apart)
    assert 0.9 <= predicted / traced.peak <= 1.1, (predicted, traced.peak)


@pytest.mark.parametrize("config", [PRESETS["safe"],
                                    DBCacheConfig(threshold=0.16, taylorseer=TaylorSeerConfig(order=1)),
                                    DBCacheConfig(threshold=1e-9)],
                         ids=["safe", "dbcache-taylor", "dbcache-always-computing"])
def test_step_cache_memory_formula_matches_traced_allocations(config):
    """The cache's state and transients over five steps, on top of the forward's activations: 0.9-1.1."""
    spec = replace(DIT_SPECS["t2v-A14B"], dim=768, ffn_dim=2048, num_heads=6, num_layers=3,
                   text_dim=TINY_DIT_SPECS["t2v-A14B"].text_dim)
    model = bf16_dit(spec)
    apply_cache(model, config)
    x, t = torch.randn(2, spec.in_dim, 6, 40, 40), torch.full((2,), 900.0)
    context = [torch.randn(20, spec.text_dim), torch.randn(30, spec.text_dim)]
    with torch.no_grad(), LiveBytes() as traced:
        for step in range(5):
            model(x + 0.01 * step, t, context)
    predicted = dit_activation_bytes(spec, 2400) + cache_state_bytes(spec, 2400, config)
    assert 0.9 <= predicted / traced.peak <= 1.1, (predicted, traced.peak)


def test_the_plan_makes_room_for_the_cache_state():
    work = Workload("t2v-A14B", 832, 480, 81, 40)
    plain = make_plan(work, hypothetical(12, 32))
    cached = make_plan(replace(work, cache=PRESETS["fast"]), hypothetical(12, 32))
    state = cache_state_bytes(work.spec, work.tokens, PRESETS["fast"]) / 1e9
    assert cached.cache == "fast" and cached.predicted.vram_cache_gb == pytest.approx(state, abs=0.01)
    assert cached.resident_blocks < plain.resident_blocks  # the state displaces resident blocks
    assert cached.predicted.peak_vram_gb <= 12
    assert read_profile(plan_to_toml(cached), "saved.toml")["cache"] == "fast"


def test_t5_activation_formula_matches_traced_allocations():
    """Full-width umT5 layers (two: the peak does not grow past the second) on two 512-token prompts, bf16."""
    from wanlite.models.t5 import build_umt5
    from wanlite.specs import T5Spec

    torch.manual_seed(0)
    model = build_umt5(T5Spec(vocab_size=512, num_layers=2)).to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 512))
    with torch.no_grad(), LiveBytes() as traced:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert 0.9 <= t5_activation_bytes() / traced.peak <= 1.1, (t5_activation_bytes(), traced.peak)


def test_guide_one_and_runtime_loras_enter_the_plan():
    """Lightning's single pass halves the activations and the compute; runtime LoRA branches add block bytes."""
    work = Workload("t2v-A14B", 832, 480, 81, 4)
    cfg = make_plan(work, hypothetical(24, 64))
    single = make_plan(replace(work, passes=1), hypothetical(24, 64))
    assert single.predicted.vram_activations_gb < 0.6 * cfg.predicted.vram_activations_gb
    assert single.predicted.s_per_step < 0.6 * cfg.predicted.s_per_step
    branched = make_plan(replace(work, lora_rank=128), hypothetical(12, 32))
    plain = make_plan(work, hypothetical(12, 32))
    assert branched.predicted.vram_weights_gb > plain.predicted.vram_weights_gb or \
        branched.resident_blocks < plain.resident_blocks


def test_chunked_blocks_compute_the_same_numbers():
    torch.manual_seed(0)
    block = WanBlock(128, 256, 2, 1e-6).eval()
    for frames in (1, 4):  # one timestep for all tokens, and one per latent frame (TI2V)
        x = torch.randn(2, 512, 128)
        inputs = BlockInputs(torch.randn(2, frames, 6, 128), torch.randn(2, 40, 128), rope_cos_sin((4, 8, 16), 64))
        with torch.no_grad():
            whole = block(x, inputs)
            chunked = block(x, replace(inputs, chunk=100))
        assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version,side", [("2.1", 64), ("2.2", 128)])
def test_vae_decode_formula_matches_traced_allocations(version, side):
    # on meta: the same allocations as a real decode (checked once: equal peaks), without the compute
    with torch.device("meta"):
        vae = WanVAE(VAE_SPECS["vae" + version]).eval()
    stride = vae.spec.stride[1]
    z = torch.randn(1, vae.spec.z_dim, 3, side // stride, side // stride, device="meta")
    with torch.no_grad(), LiveBytes() as traced:
        vae.decode(z)
    task = {"2.1": "t2v-A14B", "2.2": "ti2v-5B"}[version]
    predicted = vae_decode_bytes(task, side, side, 9, None)
    assert 0.9 <= predicted / traced.peak <= 1.1, (predicted, traced.peak)


@pytest.mark.parametrize("version,stride,tile", [("2.1", 8, 32), ("2.2", 16, 16)])
@pytest.mark.parametrize("height,width", [(480, 832), (720, 1280)])
def test_tiled_vae_decode_formula_matches_traced_allocations(version, stride, tile, height, width):
    """Full-size VAEs on meta (no compute): the tiles' peak, or the whole-frame middle block's where it is
    larger (Wan2.1 at 720p: its attention over 14,400 latent pixels)."""
    from wanlite.models.vae import Tiling

    with torch.device("meta"):
        vae = WanVAE(VAE_SPECS["vae" + version]).eval()
    z = torch.randn(1, vae.spec.z_dim, 2, height // stride, width // stride, device="meta")
    with torch.no_grad(), LiveBytes() as traced:
        vae.decode_tiled(z, Tiling(tile, tile // 4), out_device="meta")
    task = "t2v-A14B" if version == "2.1" else "ti2v-5B"
    predicted = vae_decode_bytes(task, height, width, 0, tile * stride)
    assert 0.9 <= predicted / traced.peak <= 1.12, (predicted, traced.peak)


@pytest.mark.parametrize("task,size", [("t2v-A14B", (832, 480)), ("t2v-A14B", (1280, 720)),
                                       ("i2v-A14B", (1280, 720)), ("ti2v-5B", (1280, 704))])
def test_every_task_fits_12gb_vram_and_32gb_ram(task, size):
    plan = make_plan(Workload(task, *size, 81, 40), hypothetical(12, 32))
    assert plan.device == "cuda"
    assert plan.predicted.peak_vram_gb <= 12 * 0.9 and plan.predicted.peak_ram_gb <= 32
    assert plan.predicted.s_per_step > 0


def test_a14b_480p_fits_8gb():
    plan = make_plan(Workload("t2v-A14B", 832, 480, 81, 40), hypothetical(8, 32))
    assert plan.offload == "block" and plan.chunk_tokens > 0
    assert plan.predicted.peak_vram_gb <= 8 * 0.9


def test_the_planner_prefers_precision_when_memory_allows():
    ampere = replace(hypothetical(80, 128), fp8_matmul=False, compute_capability=(8, 6))  # no fp8 GEMMs
    big = make_plan(Workload("ti2v-5B", 1280, 704, 121, 50), ampere)
    assert big.weight_format == "bf16" and big.offload == "none"
    ada = make_plan(Workload("ti2v-5B", 1280, 704, 121, 50), hypothetical(80, 128))
    assert ada.weight_format == "fp8"  # faster there: fp8 GEMMs
    small = make_plan(Workload("t2v-A14B", 832, 480, 81, 40), hypothetical(12, 32))
    assert small.weight_format != "bf16"
    assert any("instead of bf16" in r for r in small.reasons)


def test_impossible_constraints_say_so_and_what_would_fit():
    with pytest.raises(WanliteError, match="does not fit") as err:
        make_plan(Workload("t2v-A14B", 1280, 720, 81, 40), hypothetical(4, 32), quant="none")
    assert "--size" in str(err.value) or "--quant" in str(err.value)


def test_plan_roundtrips_through_a_profile(tmp_path):
    plan = make_plan(Workload("t2v-A14B", 832, 480, 81, 40), hypothetical(12, 32))
    choices = read_profile(plan_to_toml(plan), "saved.toml")
    for key in ("quant", "offload", "resident_blocks", "prefetch", "ram_mode", "chunk_tokens", "vae_tile"):
        assert choices[key] == getattr(plan, key)


def test_shipped_profiles_load_and_plan():
    names = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
    assert {"8gb", "12gb", "16gb", "24gb", "notebook", "cpu"} <= set(names)
    for name in names:
        choices, _ = load_profile(name)
        hw = hypothetical(choices.get("vram_gb"), choices["ram_gb"], choices.get("disk_gbps", 2.0), choices.get("gpu"))
        plan = make_plan(Workload("ti2v-5B", 1280, 704, 121, 50), hw)
        assert plan.predicted.peak_ram_gb <= choices["ram_gb"]


@pytest.mark.parametrize("text,match", [("[plan]\nquant = 8\n", "quant = 8 must be a string"),
                                        ("[plan]\nresident = 3\n", "unknown key 'resident'"),
                                        ("[gpu]\nvram_gb = 3\n", r"unknown section \[gpu\]"),
                                        ("[hardware]\nvram_gb = 'big'\n", "vram_gb = 'big' must be a number"),
                                        ("[plan\n", "not valid TOML")])
def test_bad_profiles_name_the_key(text, match):
    with pytest.raises(WanliteError, match=match):
        read_profile(text, "my.toml")


def test_cli_plan_json_and_errors(capsys, tmp_path):
    assert main(["plan", "--task", "t2v-A14B", "--size", "1280*720", "--vram", "12", "--ram", "32", "--json",
                 "--save", str(tmp_path / "p.toml")]) == 0
    job = json.loads(capsys.readouterr().out)["job"]
    for key in ("peak_vram_gb", "peak_ram_gb", "s_per_step"):
        assert job["predicted"][key] > 0
    assert job["weights"]["quant"] and job["offload"]["mode"] in ("none", "model", "block")
    assert "[plan]" in (tmp_path / "p.toml").read_text()
    assert main(["plan", "--task", "t2v-A14B", "--size", "1280*720", "--vram", "4", "--quant", "none"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", "--task", "ti2v-5B", "--profile", "no-such-profile"]) == 2
    assert "12gb" in capsys.readouterr().err


def test_profile_command_measures_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    assert main(["profile", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["ram_total"] > 0 and (first["gpu"] is not None) == torch.cuda.is_available()
    cached = load_or_probe()
    assert cached.to_dict() == Hardware.from_dict(first).to_dict()  # read back, not re-measured
    assert probe(tmp_path).disk_read > 0


def test_generate_applies_the_plan_choices(tmp_path):
    ckpt = discover(write_fixture("t2v-A14B", "official", tmp_path / "ck"))
    profile = tmp_path / "mine.toml"
    profile.write_text('[plan]\noffload = "block"\nresident_blocks = 1\nprefetch = 2\nram_mode = "mmap"\n'
                       "chunk_tokens = 16\nvae_tile = 4\n", encoding="utf-8")
    args = dict(task="t2v-A14B", prompt="a red square", ckpt_dir=ckpt.root, size=(64, 64), frames=5, steps=3,
                seed=1, dtype="fp32", offload_cache=tmp_path / "cache")
    plain = generate(**args, save_file=tmp_path / "a.mp4", offload="model", chunk_tokens=0, vae_tile=4)
    planned = generate(**args, save_file=tmp_path / "b.mp4", profile=str(profile))
    job = read_mp4_metadata(planned.path)["job"]
    assert OffloadConfig(**job["offload"]).describe() == "block (k=1, d=2, ram=mmap)"
    assert job["chunk_tokens"] == 16 and [job["vae"]["tile"], job["vae"]["overlap"]] == [4, 1]
    assert np.abs(plain.frames.astype(int) - planned.frames.astype(int)).max() <= 2
    # a flag given explicitly wins over the profile
    flagged = generate(**args, save_file=tmp_path / "c.mp4", profile=str(profile), resident_blocks=0)
    assert OffloadConfig(**read_mp4_metadata(flagged.path)["job"]["offload"]).describe() == "block (k=0, d=2, ram=mmap)"


def test_cpu_machine_plans_on_the_cpu():
    hw = Hardware(None, ram_total=64 * 10**9, ram_available=60 * 10**9, bf16_flops=1e12)
    plan = make_plan(Workload("ti2v-5B", 1280, 704, 121, 50), hw)
    assert plan.device == "cpu" and plan.offload == "model"
