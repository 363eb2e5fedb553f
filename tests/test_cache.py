"""Step caching: off is bit-identical, cached steps skip exactly the middle blocks and their transfers, state is
kept per CFG branch and expert, Taylor forecasts, MagCache's known-ahead schedule, and bad settings."""
import copy

import pytest
import torch

from wanlite import generate
from wanlite.cache import (DBCacheConfig, MagCacheConfig, StepCache, TaylorSeerConfig, apply_cache, cache_config)
from wanlite.cache.base import BranchState
from wanlite.cache.magcache import read_curve, write_curve
from wanlite.cli import main
from wanlite.errors import WanliteError
from wanlite.models.dit import WanDiT
from wanlite.offload import OffloadConfig, attach_offload
from wanlite.pipelines.video_io import read_mp4_metadata
from wanlite.specs import TINY_DIT_SPECS
from wanlite.tiny import checkpoint_dir

TASK = "t2v-A14B"
BLOCKS = 6


def experts(roles=("high_noise", "low_noise")):
    torch.manual_seed(1)
    spec = TINY_DIT_SPECS[TASK].__class__(**{**TINY_DIT_SPECS[TASK].__dict__, "num_layers": BLOCKS})
    return {role: WanDiT(spec).eval() for role in roles}


def batch(seed=0, t=900.0):
    g = torch.Generator().manual_seed(seed)
    spec = TINY_DIT_SPECS[TASK]
    return (torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([t, t]),
            torch.randn(2, 7, spec.text_dim, generator=g))


def count_block_calls(model):
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: calls.append((i, args[0].shape[0])))
    return calls


def run_steps(cache, models, schedule, inputs):
    outs = []
    with torch.no_grad():
        for step, role in enumerate(schedule):
            cache.begin(step, role, ("cond", "uncond"))
            outs.append(models[role](*inputs[step]))
    return outs


def test_never_caching_is_bit_identical_to_no_cache():
    models = experts(("main",))
    inputs = [batch(s) for s in range(4)]
    with torch.no_grad():
        want = [models["main"](*i) for i in inputs]
    cache = apply_cache(models["main"], DBCacheConfig(front_blocks=2, back_blocks=1, threshold=0.0), "main")
    got = run_steps(cache, models, ["main"] * 4, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    cache.detach()
    with torch.no_grad():
        assert torch.equal(models["main"](*inputs[0]), want[0])  # detached: the plain loop again


def test_a_cached_step_skips_exactly_the_middle_blocks_and_their_transfers():
    models = experts(("main",))
    plain = copy.deepcopy(models)
    engine = attach_offload(models, OffloadConfig("block", 1, 2), "cpu", copy_on_host=True)
    copies = []
    real_copy = engine._copy
    engine._copy = lambda role, piece, buf: copies.append(piece) or real_copy(role, piece, buf)
    calls = count_block_calls(models["main"])
    cache = StepCache(DBCacheConfig(front_blocks=2, back_blocks=1, threshold=1e9, warmup_steps=1))
    cache.attach(models["main"], "main")
    engine.set_schedule(["main"] * 3)
    x, t, ctx = batch(0)
    with torch.no_grad():
        outs = []
        for step in range(3):
            cache.begin(step, "main", ("cond", "uncond"))
            engine.activate("main")
            outs.append(models["main"](x, t, ctx))
            if step == 0:
                # the warm-up step ran everything; nothing of step 1's undecided middle was copied ahead
                assert [p for p in copies if isinstance(p, int)] == [0, 1, 2, 3, 4, 5, 1]
                copies.clear()
                del calls[:]
    telemetry = engine.finish()
    # steps 1 and 2 are cached: front blocks 0-1 and back block 5 only; block 0 is resident (never copied)
    assert [i for i, _ in calls] == [0, 1, 5] * 2
    assert [p for p in copies if isinstance(p, int)] == [5, 1, 5]
    block_bytes = sum(v.nbytes for v in plain["main"].blocks[2].state_dict().values())
    assert telemetry.bytes_not_moved == 2 * 3 * block_bytes  # blocks 2-4, two cached steps
    with torch.no_grad():
        want = plain["main"](x, t, ctx)
    assert torch.equal(outs[0], want)
    assert torch.allclose(outs[1], want, atol=1e-5)  # same input each step: the reused residual is exact
    stats = cache.stats.to_dict()
    assert stats["block_evals"] == 2 * (6 + 3 + 3) and stats["block_evals_total"] == 2 * 18


def test_cond_and_uncond_keep_separate_caches():
    models = experts(("main",))
    model = models["main"]
    calls = count_block_calls(model)
    cache = apply_cache(model, DBCacheConfig(front_blocks=1, back_blocks=1, threshold=0.05, warmup_steps=1), "main")
    x, t, ctx = batch(0)
    x2 = x.clone()
    x2[0] += 2.0 * torch.randn_like(x2[0])  # the cond row changes a lot, the uncond row not at all
    with torch.no_grad():
        cache.begin(0, "main", ("cond", "uncond"))
        model(x, t, ctx)
        del calls[:]
        cache.begin(1, "main", ("cond", "uncond"))
        got = model(x2, t, ctx)
        cached_calls = list(calls)
        cache.detach()
        want = model(x2, t, ctx)
    # the middle blocks ran on the cond row alone (a batch of one); the front and back on both rows
    assert cached_calls == [(0, 2), (1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], atol=1e-5)
    assert set(cache.states) == set()  # detach drops the state
    assert cache.stats.steps_cached == 1


def test_the_expert_switch_resets_the_cache_and_the_warmup():
    models = experts()
    calls = {role: count_block_calls(m) for role, m in models.items()}
    cache = StepCache(DBCacheConfig(front_blocks=1, back_blocks=1, threshold=1e9, warmup_steps=1))
    for role, m in models.items():
        cache.attach(m, role)
    schedule = ["high_noise"] * 3 + ["low_noise"] * 3
    cache.set_schedule(schedule)
    x, t, ctx = batch(0)
    run_steps(cache, models, schedule, [(x, t, ctx)] * 6)
    ran_middle = lambda role: [n for i, n in calls[role] if i == 2]  # noqa: E731
    assert len(ran_middle("high_noise")) == 1 and len(ran_middle("low_noise")) == 1  # each expert's first step
    assert {role for role, _ in cache.states} == {"low_noise"}
    assert cache.stats.steps_cached == 2 * 4


def test_taylor_forecasts_follow_the_trend_of_the_computed_steps():
    def forecast(order, trend, at=5, computed=(0, 2, 4)):
        state = BranchState()
        for k in computed:
            state.record(k, torch.full((3,), trend(k), dtype=torch.float64), order)
        return float(state.forecast(at)[0])

    linear = lambda k: 3.0 + 2.0 * k  # noqa: E731
    assert forecast(1, linear) == pytest.approx(linear(5))
    assert forecast(0, linear) == linear(4)  # order 0: plain reuse of the last residual
    # TaylorSeer's derivative estimates are backward differences: each order gets closer on a curved trend
    quadratic = lambda k: 1.0 - k + 0.5 * k * k  # noqa: E731
    errors = [abs(forecast(order, quadratic) - quadratic(5)) for order in (0, 1, 2)]
    assert errors[0] > errors[1] > errors[2]


def test_taylorseer_and_magcache_schedules_are_known_before_the_step(tmp_path):
    models = experts(("main",))
    ts = StepCache(TaylorSeerConfig(order=1, interval=2, warmup_steps=1))
    ts.attach(models["main"], "main")
    ts.set_schedule(["main"] * 6)
    x, t, ctx = batch(0)
    seen = []
    with torch.no_grad():
        for step in range(6):
            ts.begin(step, "main", ("cond", "uncond"))
            seen.append(ts.will_run(0, 3))
            models["main"](x, t, ctx)
    assert seen == [True, True, False, True, False, True]
    ts.detach()

    curve = write_curve(tmp_path / "c.json", "x", 6, {f"main/{b}": [1.0, 1.0, 0.99, 0.99, 0.9, 0.5]
                                                      for b in ("cond", "uncond")})
    assert read_curve(curve)["steps"] == 6
    mag = StepCache(MagCacheConfig(threshold=0.03, max_skip_steps=2, retention=0.0, curve=str(curve)))
    mag.attach(models["main"], "main")
    mag.set_schedule(["main"] * 6)
    with torch.no_grad():
        decided = []
        for step in range(6):
            mag.begin(step, "main", ("cond", "uncond"))
            decided.append(mag.will_run(0, 2))
            models["main"](x, t, ctx)
    # step 0 computes; 2, 3 accumulate |1-0.99| + |1-0.9801| < 0.03; 4 passes it; 5's ratio 0.5 is far off
    assert decided == [True, False, False, True, True, True]


def test_inconsistent_settings_are_refused_with_one_line():
    with pytest.raises(WanliteError, match="no middle block"):
        apply_cache(experts(("main",))["main"], DBCacheConfig(front_blocks=4, back_blocks=2))
    with pytest.raises(WanliteError, match="negative"):
        cache_config("dbcache", threshold=-0.1)
    with pytest.raises(WanliteError, match="order 4"):
        cache_config("fast", order=4)
    with pytest.raises(WanliteError, match="ignores"):
        cache_config("off", threshold=0.1)
    with pytest.raises(WanliteError, match="front_blocks do not apply"):
        cache_config("mag", front=2)


def test_cli_rejects_bad_cache_settings_before_loading(tmp_path, capsys):
    base = ["generate", "--task", "tiny-t2v", "--prompt", "x", "--ckpt_dir", str(tmp_path / "missing")]
    assert main(base + ["--cache", "fast", "--taylorseer_order", "5"]) == 2
    assert "order 5" in capsys.readouterr().err
    # the block count is read from the checkpoint's headers, before any weight: the tiny model has 3 blocks
    tiny = ["generate", "--task", "tiny-t2v", "--prompt", "x", "--ckpt_dir", str(checkpoint_dir("tiny-t2v")),
            "--save_file", str(tmp_path / "o.mp4")]
    assert main(tiny + ["--cache", "dbcache", "--cache_fn", "2", "--cache_bn", "1"]) == 2
    assert "no middle block" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("task", ["tiny-t2v", "tiny-ti2v"])
def test_generate_with_a_cache_reports_and_stores_its_savings(tmp_path, task):
    kw = dict(task=task, prompt="a red square moving right on a black background", seed=0, dtype="fp32",
              ckpt_dir=checkpoint_dir(task), steps=12)
    ref = generate(save_file=tmp_path / "ref.mp4", **kw)
    assert ref.cache is None
    off = generate(save_file=tmp_path / "off.mp4", cache="off", **kw)
    assert (off.frames == ref.frames).all()
    cached = generate(save_file=tmp_path / "c.mp4", cache="turbo", **kw)
    assert cached.cache["block_evals_saved_x"] > 1.3
    stored = read_mp4_metadata(cached.path)["cache"]
    assert stored["policy"] == "taylorseer" and stored["block_evals"] == cached.cache["block_evals"]
    few = generate(save_file=tmp_path / "few.mp4", cache="turbo", **{**kw, "steps": 6})
    assert few.cache is None  # distilled-length schedules are not cached unless forced
    forced = generate(save_file=tmp_path / "forced.mp4", cache="dbcache", cache_threshold=10.0, cache_force=True,
                      **{**kw, "steps": 6})
    assert forced.cache["branch_steps_cached"] > 0


def test_calibrate_once_then_magcache_uses_the_curve(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "xdg"))
    kw = dict(task="tiny-ti2v", prompt="a blue circle moving up on a black background", seed=1, dtype="fp32",
              ckpt_dir=checkpoint_dir("tiny-ti2v"), steps=12)
    calibrated = generate(save_file=tmp_path / "cal.mp4", cache="calibrate", **kw)
    curve = read_curve(calibrated.cache["calibration"])
    assert calibrated.cache["branch_steps_cached"] == 0 and curve["steps"] == 12
    assert set(curve["curves"]) == {"main/cond", "main/uncond"}
    assert all(0.2 < g < 5 for g in curve["curves"]["main/cond"])
    mag = generate(save_file=tmp_path / "mag.mp4", cache="mag", cache_threshold=0.5, **kw)
    assert mag.cache["policy"] == "magcache" and mag.cache["branch_steps_cached"] > 0
    assert mag.cache["skipped_fraction"] > 0.1


def test_ti2v_with_an_image_caches_and_keeps_its_first_frame(tmp_path):
    """TI2V's per-token timesteps (frame 0 at t = 0) go through the cache unchanged; frame 0 stays the image."""
    from PIL import Image

    from wanlite.eval import psnr
    from wanlite.tiny.data import Clip, Sprite, render
    from wanlite.tiny.train import RECIPES

    clip = Clip((Sprite("red", "square", "moving right", (40.0, 64.0)),), "black", "a red square moving right")
    first = render(clip, 128, 1, 4.0, trail=RECIPES["tiny-ti2v"].trail)[0]  # drawn as the model trains
    Image.fromarray(first).save(tmp_path / "first.png")
    kw = dict(task="tiny-ti2v", prompt=clip.caption, ckpt_dir=checkpoint_dir("tiny-ti2v"), image=tmp_path / "first.png",
              seed=0, dtype="fp32", steps=12)
    ref = generate(save_file=tmp_path / "ref.mp4", **kw)
    cached = generate(save_file=tmp_path / "c.mp4", cache="dbcache", cache_threshold=0.5, **kw)
    assert cached.cache["branch_steps_cached"] > 0
    assert psnr(cached.frames[0], first) >= 25
    assert psnr(cached.frames, ref.frames) >= 20


@pytest.mark.parametrize("offload,quant", [("block", "auto"), ("model", "fp8"), ("block", "gguf-q8_0")])
def test_the_cache_works_with_offload_and_weight_formats(tmp_path, offload, quant):
    """Same decisions and numbers whether the blocks stream or not, for every weight format."""
    kw = dict(task="tiny-t2v", prompt="a blue square moving left on a black background", seed=2, dtype="fp32",
              ckpt_dir=checkpoint_dir("tiny-t2v"), steps=12, quant=quant, cache="turbo")
    whole = generate(save_file=tmp_path / "a.mp4", offload="none", **kw)
    placed = generate(save_file=tmp_path / "b.mp4", offload=offload, resident_blocks=1, **kw)
    assert placed.cache["block_evals"] == whole.cache["block_evals"] < whole.cache["block_evals_total"]
    assert (placed.frames == whole.frames).all()
