import pytest
import torch

from wanlite.errors import NumericalOverflow
from wanlite.pipelines.denoise import Conditioning, Denoiser
from wanlite.specs import TASKS

# official UniPC timesteps, T2V-A14B, 40 steps, shift 12 (spec 7.4)
T2V_TIMESTEPS = [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941, 936, 929,
                 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631, 571, 492, 386, 235]


class FakeDiT(torch.nn.Module):
    """v = scale * x for the conditional half and 0 for the unconditional half; records its calls."""

    def __init__(self, scale):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, x, t, context, y=None):
        self.calls.append((x.shape[0], t.clone(), len(context), None if y is None else y.shape))
        v = self.scale * x.float()
        v[x.shape[0] // 2:] = 0
        return v


def test_moe_switch_guidance_and_batched_cfg():
    experts = {"high_noise": FakeDiT(1.0), "low_noise": FakeDiT(2.0)}
    switches = []
    den = Denoiser(TASKS["t2v-A14B"], experts.__getitem__, Conditioning([torch.zeros(3, 8), torch.zeros(5, 8)]),
                   T2V_TIMESTEPS, guide_scale=(3.0, 4.0), on_expert=lambda role, step: switches.append((role, step)))
    schedule = den.schedule()
    assert schedule.count("high_noise") == 26 and schedule[26] == "low_noise"
    x = torch.ones(1, 16, 2, 4, 4)
    for step in range(40):
        x0 = den(x, torch.tensor(0.5), step)
        scale, guide = (1.0, 4.0) if step < 26 else (2.0, 3.0)
        # v = uncond + g * (cond - uncond) = g * scale * x ; x0 = x - sigma * v
        assert torch.allclose(x0, x - 0.5 * guide * scale * x)
    assert switches == [("high_noise", 0), ("low_noise", 26)]
    batch, t, n_ctx, _ = experts["high_noise"].calls[0]
    assert batch == 2 and n_ctx == 2 and t.tolist() == [999.0, 999.0]  # cond + uncond in one forward
    assert len(experts["high_noise"].calls) == 26 and len(experts["low_noise"].calls) == 14


def test_first_frame_is_clean_with_zero_timestep():
    model = FakeDiT(1.0)
    z = torch.full((1, 48, 1, 2, 2), 7.0)
    den = Denoiser(TASKS["ti2v-5B"], lambda role: model, Conditioning([torch.zeros(2, 8)] * 2, first_frame=z),
                   [900], guide_scale=(5.0, 5.0))
    x = torch.randn(1, 48, 3, 2, 2)
    x0 = den(x, torch.tensor(0.9), 0)
    _, t, _, _ = model.calls[0]
    assert t.shape == (2, 3) and t[:, 0].eq(0).all() and t[:, 1:].eq(900).all()
    assert torch.equal(x0[:, :, :1], z)


def test_i2v_condition_goes_to_both_branches():
    model = FakeDiT(1.0)
    y = torch.zeros(1, 20, 2, 2, 2)
    den = Denoiser(TASKS["i2v-A14B"], lambda role: model, Conditioning([torch.zeros(2, 8)] * 2, y=y), [950],
                   guide_scale=(3.5, 3.5))
    den(torch.randn(1, 16, 2, 2, 2), torch.tensor(0.95), 0)
    assert model.calls[0][3] == (2, 20, 2, 2, 2)


def test_a_guidance_overflow_is_caught_after_cfg():
    # the transformer's output is finite (v = x for the conditional half), the guided one is not: 1e38 * 10
    den = Denoiser(TASKS["t2v-A14B"], lambda role: FakeDiT(1.0), Conditioning([torch.zeros(2, 8)] * 2),
                   [999], guide_scale=(1e38, 1e38), dtype="fp32")
    with pytest.raises(NumericalOverflow, match="guidance at step 1 gave non-finite values: guide scale 1e.38 .*"
                                                "smaller --sample_guide_scale"):
        den(torch.full((1, 16, 1, 2, 2), 10.0), torch.tensor(0.9), 0)


@pytest.mark.parametrize("dtype, cause", [("fp16", "fp16 ends at 65504"), ("bf16", r"\(computed in bf16\); .*LoRA")])
def test_a_non_finite_transformer_output_names_the_cause_by_dtype(dtype, cause):
    den = Denoiser(TASKS["t2v-A14B"], lambda role: FakeDiT(float("nan")), Conditioning([torch.zeros(2, 8)] * 2),
                   [999], guide_scale=(3.0, 3.0), dtype=dtype)
    with pytest.raises(NumericalOverflow, match=f"high-noise transformer's output .*at step 1.*{cause}") as err:
        den(torch.ones(1, 16, 1, 2, 2), torch.tensor(0.9), 0)
    assert ("fp16" in str(err.value)) == (dtype == "fp16")  # only an fp16 job blames fp16
