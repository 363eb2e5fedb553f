import pytest
import torch

from conftest import rel_err
from wanlite.pipelines.samplers import SAMPLERS, make_sigmas, model_timesteps

# official default schedules (spec 7.4, computed from the official set_timesteps)
T2V = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941, 936, 929, 922, 915,
       907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631, 571, 492, 386, 235]
I2V = [999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870, 859, 846, 833, 818,
       803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416, 356, 288, 208, 113]
ANIMATE = [999, 989, 978, 965, 952, 937, 920, 902, 882, 859, 833, 803, 768, 728, 681, 624, 555, 468, 356, 208]


def test_official_timesteps_exactly():
    assert model_timesteps("unipc", 40, 12.0).tolist() == T2V
    assert sum(t >= 875 for t in T2V) == 26  # T2V-A14B switches experts after 26 high-noise steps
    assert model_timesteps("unipc", 40, 5.0).tolist() == I2V
    assert sum(t >= 900 for t in I2V) == 15
    assert model_timesteps("unipc", 20, 5.0).tolist() == ANIMATE
    ti2v = model_timesteps("unipc", 50, 5.0).tolist()
    assert ti2v[:5] == [999, 995, 991, 987, 982] and ti2v[-5:] == [356, 302, 241, 172, 92]
    s2v = model_timesteps("unipc", 40, 3.0).tolist()
    assert s2v[:5] == [999, 991, 982, 973, 963] and s2v[-4:] == [249, 195, 136, 71]


def test_dpmpp_grid_starts_at_one_and_switches_at_the_same_step():
    sig = make_sigmas("dpm++", 40, 12.0)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == 41
    assert make_sigmas("unipc", 40, 12.0)[0] < 1.0
    assert sum(t >= 875 for t in model_timesteps("dpm++", 40, 12.0).tolist()) == 26
    assert sum(t >= 900 for t in model_timesteps("dpm++", 40, 5.0).tolist()) == 15


MU, STD = 0.5, 0.8  # data distribution N(MU, STD^2): the ideal x0-denoiser is analytic


def gaussian_x0(x, sigma):
    a = 1 - sigma
    var = a * a * STD**2 + sigma * sigma
    return MU + a * STD**2 / var * (x - a * MU)


def _denoiser(x, sigma, step):
    return gaussian_x0(x, sigma)


@pytest.mark.parametrize("solver,steps", [("unipc", 30), ("dpm++", 30), ("euler", 300)])
def test_samplers_reach_the_data_distribution(solver, steps):
    noise = torch.randn(40_000, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[solver](_denoiser, noise, make_sigmas(solver, steps, 1.0))
    # the noise sample's own mean is -0.01; a first-order sampler needs many more steps for the same accuracy
    assert abs(out.mean() - MU) < 0.015 and abs(out.std() - STD) < 0.015


def test_unipc_beats_euler_at_few_steps():
    noise = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    exact = SAMPLERS["unipc"](_denoiser, noise, make_sigmas("unipc", 400, 3.0))
    errs = {s: float((SAMPLERS[s](_denoiser, noise, make_sigmas(s, 10, 3.0)) - exact).abs().mean())
            for s in ("unipc", "dpm++", "euler")}
    assert errs["unipc"] < errs["euler"] and errs["dpm++"] < errs["euler"]


def _drive(scheduler, sigmas, timesteps, x):
    scheduler.sigmas = sigmas.clone()
    scheduler.timesteps = timesteps.clone()
    scheduler._step_index = None
    scheduler._begin_index = None
    for i, t in enumerate(timesteps):
        v = (x - gaussian_x0(x, sigmas[i])) / sigmas[i]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def test_unipc_and_dpmpp_match_diffusers_on_the_same_grid():
    diffusers = pytest.importorskip("diffusers")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    common = dict(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
                  lower_order_final=True, final_sigmas_type="zero")
    for solver, scheduler in (
        ("unipc", diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)),
        ("dpm++", diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)),
    ):
        sigmas = make_sigmas(solver, 20, 5.0)
        scheduler.set_timesteps(20)
        ref = _drive(scheduler, sigmas, model_timesteps(solver, 20, 5.0), x.clone())
        ours = SAMPLERS[solver](_denoiser, x.clone(), sigmas)
        assert rel_err(ours, ref) <= 1e-5, solver


@pytest.mark.parametrize("args,message", [
    (("ddim", 10, 1.0), "unknown solver"), (("unipc", 0, 1.0), "at least 1"), (("unipc", 10, 0.0), "positive")])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        make_sigmas(*args)
