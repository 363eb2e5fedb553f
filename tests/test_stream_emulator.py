"""The offload engine's stream code on an emulated asynchronous device (wanlite.testing.stream_emulator): outputs
bit-identical to no offload for every k, d, RAM mode, weight format and step-cache policy, across the expert
switch, over several delay seeds; and each planted ordering bug is caught, so these tests can fail."""
import dataclasses

import pytest
import torch

from wanlite.cache import DBCacheConfig, MagCacheConfig, StepCache, TaylorSeerConfig
from wanlite.cache.magcache import write_curve
from wanlite.loading.checkpoints import with_components
from wanlite.loading.models import expert_components, load_dit
from wanlite.loading.writers import save_safetensors, write_json
from wanlite.models.dit import WanDiT
from wanlite.offload import OffloadConfig, attach_offload, open_offloaded
from wanlite.offload.stores import FileStore
from wanlite.quant import Fp8WeightConfig, GGUFWeightConfig, parse_quant, quantize_
from wanlite.specs import TINY_DIT_SPECS
from wanlite.testing.fixtures import official_dit_config, official_dit_tensors
from wanlite.testing.quant_files import write_gguf_with_gguf_py
from wanlite.testing.stream_emulator import StreamEmulator, StreamHazard

TASK = "t2v-A14B"
ROLES = ("high_noise", "low_noise")
SCHEDULE = ["high_noise"] * 2 + ["low_noise"] * 3
SEEDS = range(4)
# five blocks, small enough that one forward takes milliseconds
SPEC = dataclasses.replace(TINY_DIT_SPECS[TASK], num_layers=5, dim=64, ffn_dim=128, freq_dim=64, text_len=16,
                           text_dim=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small on a shared CPU: many times faster, and the copy worker gets a core
    yield
    torch.set_num_threads(threads)


def experts(quant=None) -> dict:
    torch.manual_seed(1)
    models = {role: WanDiT(SPEC).eval() for role in ROLES}
    return models if quant is None else {role: quantize_(m.to(torch.bfloat16), quant) for role, m in models.items()}


def batches(steps: int) -> list:
    """One CFG batch per step, drifting slowly so a step cache both computes and skips."""
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 2, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(2, 7, SPEC.text_dim, generator=g)
    return [(x + 0.02 * k * noise, torch.tensor([900.0 - 50 * k] * 2), ctx) for k in range(steps)]


def generation(models: dict, activate, schedule: list, cache_config=None) -> tuple[list, StepCache | None]:
    """The denoising loop's calls: a step cache (fresh per generation) in front of each expert, then the forwards."""
    cache = StepCache(cache_config) if cache_config is not None else None
    if cache is not None:
        for role, model in models.items():
            cache.attach(model, role)
        cache.set_schedule(schedule)
    outs = []
    with torch.no_grad():
        for step, (role, inputs) in enumerate(zip(schedule, batches(len(schedule)))):
            if cache is not None:
                cache.begin(step, role, ("cond", "uncond"))
            outs.append(activate(role)(*inputs))
    if cache is not None:
        cache.detach()
    return outs, cache


def reference(models: dict, schedule=SCHEDULE, cache_config=None) -> list:
    return generation(models, models.__getitem__, schedule, cache_config)[0]


def emulated(engine, emulator: StreamEmulator, schedule=SCHEDULE, cache_config=None, seeds=SEEDS) -> list:
    """One generation per delay seed on the same engine (parked in between, as between videos)."""
    runs = []
    for seed in seeds:
        emulator.rng.seed(seed)
        engine.set_schedule(schedule)
        models = {role: expert.model for role, expert in engine.experts.items()}
        runs.append(generation(models, engine.activate, schedule, cache_config)[0])
        engine.park()
    engine.finish()
    return runs


def identical(runs: list, want: list) -> list[bool]:
    return [all(torch.equal(a, b) for a, b in zip(got, want)) for got in runs]


def pinned(resident: int, prefetch: int, quant=None) -> tuple:
    emulator = StreamEmulator(0)
    config = OffloadConfig("block", resident, prefetch)
    return attach_offload(experts(quant), config, "cpu", copy_on_host=True, streams=emulator), emulator


@pytest.mark.parametrize("resident", [0, 2, 5])
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_every_k_and_d_is_bit_identical_with_late_copies(resident, prefetch):
    want = reference(experts())
    engine, emulator = pinned(resident, prefetch)
    assert identical(emulated(engine, emulator), want) == [True] * len(SEEDS)
    assert engine.telemetry.bytes_moved > 0


@pytest.mark.parametrize("quant", [Fp8WeightConfig(), GGUFWeightConfig("Q8_0")], ids=lambda q: q.name)
def test_every_weight_format_is_bit_identical_with_late_copies(quant):
    want = reference(experts(quant))
    engine, emulator = pinned(1, 2, quant)
    assert identical(emulated(engine, emulator, seeds=range(2)), want) == [True, True]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """The small experts as files: official safetensors (fp32) and GGUF Q4_0, each with its config.json."""
    root = tmp_path_factory.mktemp("emulated")
    files = {"safetensors": {}, "gguf": {}}
    for role, dit in experts().items():
        write_json(official_dit_config(SPEC), root / role / "config.json")
        files["safetensors"][f"{role}_model"] = root / role / "model.safetensors"
        save_safetensors(official_dit_tensors(dit), files["safetensors"][f"{role}_model"])
        files["gguf"][f"{role}_model"] = write_gguf_with_gguf_py(dit.state_dict(), root / role / "model.gguf", "Q4_0")
    return {kind: expert_components(with_components(None, paths), TASK) for kind, paths in files.items()}


@pytest.mark.parametrize("ram_mode,file,quant", [("mmap", "safetensors", "auto"), ("mmap", "gguf", "auto"),
                                                 ("disk", "safetensors", "fp8"), ("disk", "safetensors", "gguf-q8_0")])
def test_every_ram_mode_is_bit_identical_with_late_copies(checkpoint, tmp_path, ram_mode, file, quant):
    """mmap streams the file as stored (bf16, GGUF Q4_0); disk caches what quantizing on load gives."""
    comps, config = checkpoint[file], parse_quant(quant)
    want = reference({role: load_dit(comp, TASK, torch.bfloat16, config) for role, comp in comps.items()})
    for resident, prefetch in ((0, 1), (2, 0)):
        emulator = StreamEmulator(0)
        engine = open_offloaded(comps, TASK, torch.bfloat16, config,
                                OffloadConfig("block", resident, prefetch, ram_mode, cache_dir=tmp_path),
                                "cpu", streams=emulator)
        assert identical(emulated(engine, emulator, seeds=range(2)), want) == [True, True], (resident, prefetch)


def magcache(folder) -> MagCacheConfig:
    curve = write_curve(folder / "curve.json", TASK, 7, {f"{role}/{branch}": [1.0, 1.0, 0.99, 0.99, 0.98, 0.9, 0.5]
                                                      for role in ROLES for branch in ("cond", "uncond")})
    return MagCacheConfig(threshold=0.03, max_skip_steps=2, retention=0.0, curve=str(curve))


@pytest.mark.parametrize("policy", ["dbcache", "taylorseer", "magcache"])
def test_every_step_cache_policy_is_bit_identical_with_late_copies(tmp_path, policy):
    """Cached steps skip blocks (never copied), undecided ones stop the prefetcher: other copy orders."""
    cache_config = {"dbcache": DBCacheConfig(front_blocks=1, back_blocks=0, threshold=0.1, warmup_steps=1,
                                             max_consecutive_cached=1),
                    "taylorseer": TaylorSeerConfig(order=1, interval=2, warmup_steps=1, front_blocks=1,
                                                   back_blocks=1),
                    "magcache": None}[policy] or magcache(tmp_path)
    schedule = ["high_noise"] * 3 + ["low_noise"] * 4
    models = experts()
    want, cache = generation(models, models.__getitem__, schedule, cache_config)
    assert 0 < cache.stats.steps_cached < cache.stats.steps  # the cache both skipped and computed
    engine, emulator = pinned(1, 2)
    assert identical(emulated(engine, emulator, schedule, cache_config), want) == [True] * len(SEEDS)
    assert engine.telemetry.bytes_not_moved > 0


def test_calls_outside_the_announced_schedule_are_bit_identical_with_late_copies():
    """No schedule announced: each activation streams its own expert, the queue reset at every switch."""
    schedule = ["high_noise", "low_noise", "high_noise", "low_noise"]
    want = reference(experts(), schedule)
    engine, emulator = pinned(1, 1)
    runs = []
    for seed in SEEDS:
        emulator.rng.seed(seed)
        runs.append(generation({}, engine.activate, schedule)[0])
        engine.park()
    engine.finish()
    assert identical(runs, want) == [True] * len(SEEDS)


# ---------------------------------------------------------------- planted bugs: the emulator must catch them
@pytest.mark.parametrize("resident,prefetch", [(0, 0), (1, 3), (5, 1)])
def test_a_missing_wait_for_a_copy_reads_garbage(resident, prefetch):
    """Compute ignores `wait_event(buf.loaded)`: it reads buffers whose copy has not landed."""
    want = reference(experts())
    engine, emulator = pinned(resident, prefetch)
    emulator.compute.wait_event = lambda event: None
    runs = emulated(engine, emulator)
    assert identical(runs, want) == [False] * len(SEEDS)
    assert all(any(out.isnan().any() for out in outs) for outs in runs)  # the 0xFF bytes are NaN weights


@pytest.mark.parametrize("resident,prefetch", [(0, 0), (1, 3), (5, 1)])
def test_a_missing_wait_for_the_last_reader_overwrites_a_buffer_in_use(resident, prefetch):
    """The copy stream ignores `wait_event(buf.free)`: it refills buffers compute may still be reading."""
    engine, emulator = pinned(resident, prefetch)
    engine.copy_stream.wait_event = lambda event: None
    with pytest.raises(StreamHazard, match="may still be reading"):
        emulated(engine, emulator)


def test_a_staging_buffer_refilled_before_its_copy_ran_copies_wrong_bytes(checkpoint, tmp_path, monkeypatch):
    """mmap mode reads blocks into a few host staging buffers; dropping the wait for the copy out of one before
    refilling it (`FileStore._ready`) copies another block's bytes."""
    comps = checkpoint["safetensors"]
    want = reference({role: load_dit(comp, TASK, torch.bfloat16) for role, comp in comps.items()})
    monkeypatch.setattr(FileStore, "_ready", lambda self, buf: buf)
    emulator = StreamEmulator(0)
    engine = open_offloaded(comps, TASK, torch.bfloat16, None, OffloadConfig("block", 0, 1, "mmap"), "cpu",
                            streams=emulator)
    assert not any(identical(emulated(engine, emulator), want))


def test_the_emulator_itself():
    emulator = StreamEmulator(0, max_delay_s=10.0)
    emulator.rng.random = lambda: 0.0  # every copy takes the long delay
    copier, compute = emulator.stream(), emulator.current_stream()
    src, dst = torch.arange(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    with emulator.use(copier):
        emulator.copy(dst, src)
        loaded = emulator.event()
        loaded.record(copier)
    assert (dst == 0xFF).all()  # garbage until the copy ran
    compute.wait_event(loaded)  # wakes the worker instead of sleeping 10 s
    assert torch.equal(dst, src)
    with emulator.use(copier), pytest.raises(StreamHazard):
        emulator.copy(dst, src)  # compute waited for dst's copy and recorded nothing since
    free = emulator.event()
    free.record(compute)
    copier.wait_event(free)
    with emulator.use(copier):
        emulator.copy(dst, src.flip(0))
    copier.synchronize()
    assert torch.equal(dst, src.flip(0))
