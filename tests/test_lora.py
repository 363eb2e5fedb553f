"""LoRAs: every key format means the same update; merged and runtime application match the reference merge on
every weight format; per-expert LoRAs; the Lightning preset; bad input."""
from pathlib import Path

import pytest
import torch

from wanlite import generate
from wanlite.cli import main
from wanlite.errors import WanliteError
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import expert_components, load_dit
from wanlite.lora import lora_sets, map_lora, parse_lora_arg, read_tensors
from wanlite.quant import parse_quant, sqnr
from wanlite.specs import TINY_DIT_SPECS
from wanlite.testing.fixtures import write_fixture
from wanlite.testing.lora_files import random_pairs, write_lora

TASK = "t2v-A14B"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return discover(write_fixture(TASK, "official", tmp_path_factory.mktemp("lora") / "ck"))


@pytest.fixture(scope="module")
def experts(ckpt):
    return expert_components(ckpt, TASK)


@pytest.fixture(scope="module")
def pairs(experts):
    return random_pairs(load_dit(experts["high_noise"], TASK, torch.float32), rank=4, seed=0)


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([900.0, 900.0]),
            torch.randn(2, 7, TINY_DIT_SPECS[TASK].text_dim, generator=g))


def reference_merge(model, pairs, strength, alpha=None):
    with torch.no_grad():
        for name, (down, up) in pairs.items():
            w = model.get_submodule(name).weight
            scale = strength * (1.0 if alpha is None else alpha / down.shape[0])
            w.copy_((w.float() + scale * up @ down).to(w.dtype))
    return model


@pytest.mark.parametrize("fmt", ["native", "peft", "kohya", "diffusers"])
def test_every_key_format_maps_to_the_same_update(tmp_path, experts, pairs, fmt):
    model = load_dit(experts["high_noise"], TASK, torch.float32)
    path = write_lora(tmp_path / f"{fmt}.safetensors", pairs, fmt, alpha=2.0)
    lora = map_lora(path, read_tensors(path), model)
    assert lora.format == ("native" if fmt == "peft" else fmt) and not lora.unmatched
    assert set(lora.low_rank) == set(pairs)
    for name, (down, up) in pairs.items():
        got = lora.low_rank[name]
        assert torch.allclose(got.scale * got.up @ got.down, 0.5 * up @ down, atol=1e-7)


@pytest.mark.parametrize("mode", ["auto", "runtime"])
def test_merged_and_runtime_match_the_reference_merge(tmp_path, experts, pairs, mode):
    path = write_lora(tmp_path / "l.safetensors", pairs, alpha=8.0)
    want_model = reference_merge(load_dit(experts["high_noise"], TASK, torch.float32), pairs, 0.7, alpha=8.0)
    sets = lora_sets([f"{path}:0.7"], [], [], {"high_noise": experts["high_noise"]}, TASK, mode)
    model = load_dit(experts["high_noise"], TASK, torch.float32, lora=sets["high_noise"])
    counts = sets["high_noise"].counts
    assert (counts["merged"], counts["runtime"]) == ((len(pairs), 0) if mode == "auto" else (0, len(pairs)))
    with torch.no_grad():
        want, got = want_model(*inputs()), model(*inputs())
    assert (got - want).abs().max() / want.abs().max() <= 1e-3


@pytest.mark.parametrize("quant", ["fp8", "gguf-q8_0", "gguf-q4_k", "int8"])
def test_quantized_weights_take_a_lora_merged_before_quantizing_or_as_a_branch(tmp_path, experts, pairs, quant):
    """Quantize-on-load merges first (merge-then-quantize); a runtime branch on the quantized weights agrees."""
    path = write_lora(tmp_path / "l.safetensors", pairs)
    config = parse_quant(quant)
    want = reference_merge(load_dit(experts["high_noise"], TASK, torch.float32), pairs, 1.0)
    with torch.no_grad():
        reference = want(*inputs())
    outs = {}
    for mode in ("auto", "runtime"):
        sets = lora_sets([str(path)], [], [], {"high_noise": experts["high_noise"]}, TASK, mode)
        model = load_dit(experts["high_noise"], TASK, torch.bfloat16, config, sets["high_noise"])
        with torch.no_grad():
            outs[mode] = model(*inputs())
    # the bar: both match the bf16 merge reference to >= 35 dB (measured 42-46 dB per forward)
    assert sqnr(reference, outs["auto"]) >= 35 and sqnr(reference, outs["runtime"]) >= 35
    merged_vs_runtime = 10 * torch.log10(outs["auto"].pow(2).mean() / (outs["auto"] - outs["runtime"]).pow(2).mean())
    assert merged_vs_runtime >= 35  # measured 40.6 (Q4_K) to 52.6 dB (Q8_0)


def test_stored_gguf_weights_merge_and_requantize_or_branch(tmp_path, pairs):
    """A pre-quantized GGUF file: auto keeps it as stored plus a branch; merge re-quantizes to its own type."""
    from wanlite.loading.checkpoints import with_components
    from wanlite.testing.fixtures import build_tiny_models
    from wanlite.testing.quant_files import write_gguf_with_gguf_py

    dits, _, _ = build_tiny_models(TASK)
    files = {f"{role}_model": write_gguf_with_gguf_py(dit.state_dict(), tmp_path / f"{role}.gguf", "Q8_0")
             for role, dit in dits.items()}
    comps = expert_components(with_components(None, files), TASK)
    path = write_lora(tmp_path / "l.safetensors", pairs)
    outs, kinds = {}, {}
    for mode in ("auto", "merge"):
        sets = lora_sets([str(path)], [], [], {"high_noise": comps["high_noise"]}, TASK, mode)
        model = load_dit(comps["high_noise"], TASK, torch.bfloat16, None, sets["high_noise"])
        kinds[mode] = type(model.get_submodule("blocks.0.self_attn.q")).__name__, sets["high_noise"].counts
        with torch.no_grad():
            outs[mode] = model(*inputs())
    assert kinds["auto"][0] == "QLinear" and kinds["auto"][1]["runtime"] == len(pairs)
    assert kinds["merge"][0] == "QLinear" and kinds["merge"][1]["merged"] == len(pairs)
    assert sqnr(outs["auto"], outs["merge"]) >= 20


def test_lora_on_both_experts_or_one(tmp_path, experts, pairs):
    path = write_lora(tmp_path / "l.safetensors", pairs)
    both = lora_sets([str(path)], [], [], experts, TASK)
    assert set(both) == {"high_noise", "low_noise"}
    high = lora_sets([], [f"{path}:0.5"], [], experts, TASK)
    assert set(high) == {"high_noise"} and high["high_noise"].loras[0][1] == 0.5
    with pytest.raises(WanliteError, match="two-expert"):
        lora_sets([], [str(path)], [], {"main": experts["high_noise"]}, "ti2v-5B")


def test_lora_travels_with_its_block_under_offload(tmp_path, experts, pairs):
    from wanlite.offload import OffloadConfig, open_offloaded

    path = write_lora(tmp_path / "l.safetensors", pairs)
    sets = lora_sets([str(path)], [], [], experts, TASK, "runtime")
    plain = {role: load_dit(comp, TASK, torch.float32, lora=sets[role]) for role, comp in experts.items()}
    with torch.no_grad():
        want = plain["high_noise"](*inputs())
    for ram_mode in ("pinned", "mmap", "disk"):
        sets = lora_sets([str(path)], [], [], experts, TASK, "runtime")
        engine = open_offloaded(experts, TASK, torch.float32, None,
                                OffloadConfig("block", 1, 1, ram_mode, cache_dir=tmp_path / "oc"), "cpu",
                                copy_on_host=True, loras=sets)
        engine.set_schedule(["high_noise"])
        with torch.no_grad():
            got = engine.activate("high_noise")(*inputs())
        engine.finish()
        assert torch.allclose(got, want, atol=1e-5), ram_mode


def test_unmatched_keys_are_reported(tmp_path, experts, pairs):
    extra = {"diffusion_model.blocks.99.self_attn.q.lora_down.weight": torch.zeros(4, 8),
             "diffusion_model.blocks.99.self_attn.q.lora_up.weight": torch.zeros(8, 4)}
    path = write_lora(tmp_path / "l.safetensors", pairs, extra=extra)
    events = []
    lora_sets([str(path)], [], [], {"high_noise": experts["high_noise"]}, TASK, emit=events.append)
    assert any("2 keys match nothing" in e["message"] and "blocks.99" in e["message"] for e in events)


def test_bad_lora_input_is_one_clear_line(tmp_path, experts, pairs, capsys):
    comps = {"high_noise": experts["high_noise"]}
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WanliteError, match="not a readable LoRA"):
        lora_sets([str(junk)], [], [], comps, TASK)
    wide = {name: (torch.zeros(4, down.shape[1] + 8), torch.zeros(up.shape[0], 4))
            for name, (down, up) in pairs.items()}
    with pytest.raises(WanliteError, match="another architecture"):
        lora_sets([str(write_lora(tmp_path / "w.safetensors", wide))], [], [], comps, TASK)
    bad_rank = {name: (down, up[:, :2]) for name, (down, up) in pairs.items()}
    with pytest.raises(WanliteError, match="rank mismatch"):
        lora_sets([str(write_lora(tmp_path / "r.safetensors", bad_rank))], [], [], comps, TASK)
    with pytest.raises(WanliteError, match="not a number"):
        parse_lora_arg("style.safetensors:strong")
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (Path(r"C:\loras\x.safetensors"), 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors:0.8") == (Path(r"C:\loras\x.safetensors"), 0.8)
    i2v_patch = {"diffusion_model.patch_embedding.diff": torch.zeros(TINY_DIT_SPECS[TASK].dim, 36, 1, 2, 2)}
    with pytest.raises(WanliteError, match="another architecture"):
        lora_sets([str(write_lora(tmp_path / "i2v.safetensors", {}, extra=i2v_patch))], [], [], comps, TASK)
    rc = main(["generate", "--task", "tiny-t2v", "--prompt", "x", "--ckpt_dir", str(tmp_path / "none"),
               "--lora", "a.safetensors:abc"])
    assert rc == 2 and "not a number" in capsys.readouterr().err


def test_lightning_preset_runs_four_single_pass_steps(tmp_path):
    """4 Euler steps on sigma = [1, 0.9375, 0.8333, 0.625], guide 1: one cond-only forward per step, 2 + 2."""
    from wanlite.tiny import checkpoint_dir

    calls = []
    events = []
    import wanlite.models.dit as dit

    original = dit.WanDiT.forward

    def counting(self, x, t, context, y=None):
        calls.append((x.shape[0], float(t.reshape(-1)[0])))
        return original(self, x, t, context, y)

    dit.WanDiT.forward = counting
    try:
        out = generate(task="tiny-t2v", prompt="a red square moving right", ckpt_dir=checkpoint_dir("tiny-t2v"),
                       preset="lightning", save_file=tmp_path / "l.mp4", seed=0, progress=events.append)
    finally:
        dit.WanDiT.forward = original
    assert out.settings.steps == 4 and out.settings.solver == "euler" and out.settings.guide_scale == (1.0, 1.0)
    assert [n for n, _ in calls] == [1, 1, 1, 1]  # guide 1: the cond pass alone, no uncond batch row
    assert [t for _, t in calls] == pytest.approx([1000.0, 937.5, 833.3333, 625.0])
    roles = [e["role"] for e in events if e.get("event") == "step"]
    assert roles == ["high_noise", "high_noise", "low_noise", "low_noise"]


def test_lightning_3phase_runs_cfg_without_the_lora_first(tmp_path, monkeypatch):
    """8 Euler steps at shift 3: t >= 965 with CFG 3.5 and the LoRA off, then LoRA at guide 1; the expert switch
    moves to t = 800."""
    import wanlite.lora.apply as apply
    import wanlite.models.dit as dit
    from wanlite.tiny import checkpoint_dir

    tiny = expert_components(discover(checkpoint_dir("tiny-t2v")), "tiny-t2v")
    path = write_lora(tmp_path / "l.safetensors", random_pairs(load_dit(tiny["high_noise"], "tiny-t2v"), rank=2))
    calls, branch_gains = [], []
    original = dit.WanDiT.forward

    def counting(self, x, t, context, y=None):
        calls.append((x.shape[0], float(t.reshape(-1)[0])))
        return original(self, x, t, context, y)

    def hook(lora, module, args, output):
        branch_gains.append(lora.gain)
        return output if lora.gain == 0 else output + lora.gain * 0 * output

    monkeypatch.setattr(dit.WanDiT, "forward", counting)
    monkeypatch.setattr(apply, "lora_branch_hook", hook)
    events = []
    out = generate(task="tiny-t2v", prompt="a red square moving right", ckpt_dir=checkpoint_dir("tiny-t2v"),
                   preset="lightning-3phase", lora_high=(str(path),), lora_low=(str(path),),
                   save_file=tmp_path / "p.mp4", seed=0, progress=events.append)
    assert out.settings.steps == 8 and out.settings.boundary == 0.8
    assert [n for n, _ in calls] == [2] + [1] * 7  # CFG only in the first phase
    roles = [e["role"] for e in events if e.get("event") == "step"]
    assert roles == ["high_noise"] * 4 + ["low_noise"] * 4  # t = 1000, 954.5, 900, 833 | 750 ...
    per_step = len(branch_gains) // 8
    assert set(branch_gains[:per_step]) == {0.0} and set(branch_gains[per_step:]) == {1.0}
    with pytest.raises(WanliteError, match="merged weights"):
        generate(task="tiny-t2v", prompt="x", ckpt_dir=checkpoint_dir("tiny-t2v"), preset="lightning-3phase",
                 lora_high=(str(path),), lora_mode="merge", save_file=tmp_path / "m.mp4")


def test_the_bundled_tiny_lora_turns_black_backgrounds_grey(tmp_path):
    """The LoRA trained here (python -m wanlite.tiny.lora), per expert like Lightning's files."""
    import numpy as np

    from wanlite.tiny import checkpoint_dir
    from wanlite.tiny.lora import LORA_DIR

    def grey(frames):
        f = frames.astype(np.int16)
        mean = f.mean(axis=-1)
        return ((f.max(axis=-1) - f.min(axis=-1) < 40) & (mean >= 60) & (mean <= 170)).mean()

    kw = dict(task="tiny-t2v", prompt="a blue circle moving up on a black background", seed=1, dtype="fp32",
              ckpt_dir=checkpoint_dir("tiny-t2v"), steps=12)
    base = generate(save_file=tmp_path / "b.mp4", **kw)
    lora = generate(save_file=tmp_path / "l.mp4", lora_high=(str(LORA_DIR / "high_noise_model.safetensors"),),
                    lora_low=(str(LORA_DIR / "low_noise_model.safetensors"),), **kw)
    assert grey(base.frames) < 0.05 and grey(lora.frames) > 0.2


def test_auto_keeps_loras_as_branches_on_fp8_weights(tmp_path):
    """e4m3 rounds a merged LoRA update away; auto leaves it a branch there, and merges for the other formats."""
    from wanlite.pipelines.video_io import read_mp4_metadata
    from wanlite.tiny import checkpoint_dir
    from wanlite.tiny.lora import LORA_DIR

    kw = dict(task="tiny-t2v", prompt="a blue circle moving up on a black background", seed=1, steps=2,
              ckpt_dir=checkpoint_dir("tiny-t2v"), lora_high=(str(LORA_DIR / "high_noise_model.safetensors"),),
              lora_low=(str(LORA_DIR / "low_noise_model.safetensors"),))
    for quant, branched in (("fp8", True), ("gguf-q8_0", False)):
        out = generate(save_file=tmp_path / f"{quant}.mp4", quant=quant, **kw)
        applied = read_mp4_metadata(out.path)["lora_applied"]["high_noise"]
        assert (applied["runtime"] > 0 and applied["merged"] == 0) == branched, (quant, applied)


@pytest.mark.parametrize("quant", ["gguf-q8_0", "fp8"])
def test_merged_and_quantized_weights_are_cached_per_lora_combination(tmp_path, quant):
    import numpy as np

    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import expert_components, load_dit
    from wanlite.offload import load_merged_cached
    from wanlite.pipelines.video_io import read_mp4_metadata
    from wanlite.quant import parse_quant
    from wanlite.tiny import checkpoint_dir
    from wanlite.tiny.lora import LORA_DIR

    comps = expert_components(discover(checkpoint_dir("tiny-t2v")), "tiny-t2v")
    high = str(LORA_DIR / "high_noise_model.safetensors")
    config = parse_quant(quant)

    def loaded(cached: bool, strength: float):
        sets = lora_sets([f"{high}:{strength}"], [], [], {"high_noise": comps["high_noise"]}, "tiny-t2v", "merge")
        if cached:
            return load_merged_cached(comps["high_noise"], "high_noise", "tiny-t2v", torch.bfloat16, config,
                                      sets["high_noise"], tmp_path / "merged"), sets["high_noise"]
        return load_dit(comps["high_noise"], "tiny-t2v", torch.bfloat16, config, sets["high_noise"]), sets["high_noise"]

    direct, _ = loaded(False, 0.8)
    written, _ = loaded(True, 0.8)
    read_back, lora = loaded(True, 0.8)
    assert lora.counts.get("cached") and lora.counts["merged"] > 0
    want = direct.state_dict()
    for got in (written.state_dict(), read_back.state_dict()):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    loaded(True, 0.5)  # another strength: its own folder, the first is kept
    assert len(list((tmp_path / "merged").iterdir())) == 2
    if quant == "fp8":
        return  # auto keeps fp8 LoRAs as branches: nothing merged to cache in a generation
    kw = dict(task="tiny-t2v", prompt="a blue circle moving up on a black background", seed=1, steps=2,
              ckpt_dir=checkpoint_dir("tiny-t2v"), quant="gguf-q8_0", lora_high=(high,),
              lora_low=(str(LORA_DIR / "low_noise_model.safetensors"),), offload_cache=tmp_path / "gen")
    first = generate(save_file=tmp_path / "a.mp4", **kw)
    second = generate(save_file=tmp_path / "b.mp4", **kw)
    assert np.array_equal(first.frames, second.frames)
    assert read_mp4_metadata(second.path)["lora_applied"]["high_noise"].get("cached")
