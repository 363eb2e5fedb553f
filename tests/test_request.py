import pytest

from wanlite.errors import WanliteError
from wanlite.pipelines.conditioning import best_output_size, max_area_size
from wanlite.pipelines.request import Request, parse_size, validate
from wanlite.specs import DEFAULT_NEGATIVE_PROMPT


def _req(**kw):
    base = dict(task="t2v-A14B", prompt="a cat", ckpt_dir="x")
    return Request(**{**base, **kw})


def test_defaults_are_the_official_ones():
    s = validate(_req(), seed=5)
    assert (s.steps, s.shift, s.guide_scale, s.frames, s.fps, s.size) == (40, 12.0, (3.0, 4.0), 81, 16, (1280, 720))
    assert s.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    t = validate(_req(task="ti2v-5B"), seed=5)
    assert (t.steps, t.shift, t.guide_scale, t.frames, t.fps, t.size) == (50, 5.0, (5.0, 5.0), 121, 24, (1280, 704))


@pytest.mark.parametrize("kw,message", [
    (dict(size=(1000, 720)), "width 1000 is not a multiple of 16 for t2v-A14B; nearest valid widths: 992 or 1008"),
    (dict(task="ti2v-5B", size=(1280, 720)), "height 720 is not a multiple of 32 for ti2v-5B; nearest valid heights: 704 or 736"),
    (dict(frames=80), "must be 4k+1 (the VAE packs 4 frames per latent); nearest valid values: 77 or 81"),
    (dict(image="cat.png"), "--image is not used by t2v-A14B"),
    (dict(task="i2v-A14B"), "pass --image"),
    (dict(task="t2v-14B"), "unknown --task 't2v-14B'; choose one of t2v-A14B, i2v-A14B, ti2v-5B"),
    (dict(solver="ddim"), "--sample_solver 'ddim' is unknown"),
    (dict(steps=0), "at least 1"),
    (dict(shift=-1.0), "positive"),
])
def test_bad_requests(kw, message):
    with pytest.raises(WanliteError) as err:
        validate(_req(**kw), seed=0)
    assert message in str(err.value)


def test_parse_size():
    assert parse_size("1280*720") == (1280, 720) and parse_size("832x480") == (832, 480)
    with pytest.raises(WanliteError, match="WIDTH\\*HEIGHT"):
        parse_size("big")


def test_i2v_max_area_size_follows_image_aspect():
    # official: lat = round(sqrt(area * ar) // 8 // 2 * 2)
    assert max_area_size((1920, 1080), 1280 * 720, 8, 2) == (1280, 720)
    w, h = max_area_size((1000, 1000), 1280 * 720, 8, 2)
    assert w == h and w % 16 == 0 and w * h <= 1280 * 720


def test_ti2v_best_output_size():
    # values of the official best_output_size(w, h, 32, 32, 1280*704)
    assert best_output_size((1920, 1080), 1280 * 704) == (1248, 704)
    assert best_output_size((1080, 1920), 1280 * 704) == (704, 1248)
    assert best_output_size((1280, 704), 1280 * 704) == (1280, 704)
