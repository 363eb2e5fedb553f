"""--use_prompt_extend: tiny random Qwen2 / Qwen2-VL models built here (no download), a stand-in DashScope
server on 127.0.0.1, the planner's accounting of the extender, and the record that --replay reads."""
from __future__ import annotations

import gc
import io
import json
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from wanlite.cli import main
from wanlite.errors import WanliteError
from wanlite.pipelines.job import PromptExtendPlan
from wanlite.pipelines.prompt_extend import (KNOWN_CONFIGS, SYSTEM_PROMPTS, PromptExtendError, PromptExtendKeyError,
                                             _config_json, clean, decoder_linear, extend_job, extend_prompt,
                                             extender_spec, load_local, quantized_on_arrival)
from wanlite.pipelines.request import Request
from wanlite.pipelines.resolve import resolve
from wanlite.planner import hypothetical, make_plan
from wanlite.planner.estimate import Workload, extender_activation_bytes, extender_bytes
from wanlite.quant import HANDLERS, parse_quant, quantize_
from wanlite.testing.dashscope_stub import serve
from wanlite.tiny import checkpoint_dir

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# a Qwen-style ChatML template, images as <|vision_start|><|image_pad|><|vision_end|>
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "a the red blue cat dog runs walks on grass in snow light camera slowly moving scene detailed".split()


def write_tokenizer(folder: Path):
    """A word-level tokenizer with Qwen's special tokens and a chat template, built from nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL, "[UNK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,:!?"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]", additional_special_tokens=SPECIAL[1:])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_config(tokenizer, hidden: int = 32) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    """A random Qwen2 chat model, hidden 256 (a multiple of GGUF's 256-value blocks, so Q4_K applies)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("qwen2")
    config = Qwen2Config(**text_config(write_tokenizer(folder), hidden=256))
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory) -> Path:
    """A random Qwen2-VL model: its vision tower (1 block), tokenizer and PIL image processor, saved as a repo."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("qwen2vl")
    tokenizer = write_tokenizer(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    text = {**text_config(tokenizer), "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}}
    config = Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    return folder


@pytest.fixture()
def picture(tmp_path) -> Path:
    path = tmp_path / "first.png"
    Image.new("RGB", (1600, 900), (200, 40, 40)).save(path)  # above the VL pixel limit: scaled down first
    return path


def local(model: Path, vision: bool = False, **kw) -> PromptExtendPlan:
    return PromptExtendPlan("local_qwen", str(model), "en", vision, **{"device": "cpu", "quant": "none",
                                                                        "max_new_tokens": 4, **kw})


# ------------------------------------------------------------------------------------------------ local_qwen

@pytest.mark.parametrize("quant", ["none", "int8", "gguf-q4_k"])
def test_local_qwen2_rewrites_greedily(qwen2, quant):
    plan = local(qwen2, quant=quant)
    first = extend_prompt(plan, "a red cat runs on grass", dtype="fp32")  # fp32: fast CPU matmuls
    assert first.extended and "\n" not in first.extended and first.method == "local_qwen"
    assert first.original == "a red cat runs on grass"
    if quant == "none":  # greedy: the same rewrite each time
        assert extend_prompt(plan, "a red cat runs on grass", dtype="fp32") == first


def test_local_qwen2_vl_reads_the_image(qwen2_vl, picture):
    plan = local(qwen2_vl, vision=True)
    first = extend_prompt(plan, "the cat walks slowly", picture, dtype="fp32")
    assert first == extend_prompt(plan, "the cat walks slowly", picture, dtype="fp32")
    assert first.extended


def last_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(7, 19)[None]).logits[0, -1].float()


def layout(model) -> dict:
    """Each module's class and its weight's (torchao's int8 keeps a Linear holding an int8 tensor subclass)."""
    return {n: (type(m).__name__, type(getattr(m, "weight", None)).__name__) for n, m in model.named_modules()}


def decoder_shapes(model) -> set:
    """The shapes only the weights of decoder Linears have (tiny models share some with the embeddings)."""
    decoder = {f"{n}.weight" for n, m in model.named_modules() if decoder_linear(n, m)}
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if n in decoder}
    return shapes - {tuple(p.shape) for n, p in model.named_parameters() if n not in decoder}


@pytest.mark.parametrize("fixture,quant", [("qwen2", "int8"), ("qwen2", "gguf-q4_k"), ("qwen2_vl", "int8")])
def test_quantized_while_loading_matches_quantizing_after(request, monkeypatch, fixture, quant):
    """Quantizing each decoder weight as transformers sets it gives the model that reading all of them and
    quantizing afterwards gives (the same logits, bit for bit), and no more than one of those weights is ever
    alive in full precision (counted at each quantization: every live tensor of a decoder Linear's shape)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    folder = request.getfixturevalue(fixture)
    kind = AutoModelForImageTextToText if fixture == "qwen2_vl" else AutoModelForCausalLM
    reference = kind.from_pretrained(folder, dtype=torch.float32)
    shapes, linears = decoder_shapes(reference), sum(decoder_linear(n, m) for n, m in reference.named_modules())
    quantize_(reference, parse_quant(quant), filter_fn=decoder_linear)
    config = parse_quant(quant)
    handler, alive = HANDLERS[type(config)], []

    def counting(linear, config):
        full = {t.data_ptr() for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter)
                and not t.is_meta and t.is_floating_point() and tuple(t.shape) in shapes
                and t.untyped_storage().nbytes() >= t.nbytes}  # not a stand-in (one value, expanded)
        alive.append(len(full))
        return handler(linear, config)

    monkeypatch.setitem(HANDLERS, type(config), counting)
    plan = local(folder, vision=fixture == "qwen2_vl", quant=quant)
    model = load_local(plan, "fp32", lambda event: None)[0]
    assert shapes and len(alive) == linears and max(alive) == 1
    assert layout(model) == layout(reference)
    assert torch.equal(last_logits(model), last_logits(reference))
    # a model whose weights arrived before the hooks (no attribute set while loading) is quantized afterwards
    late = kind.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(last_logits(quantized_on_arrival(lambda: late, config, decoder_linear)),
                       last_logits(reference))


def test_a_quantized_extender_needs_safetensors(qwen2, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen2 / name).read_bytes())
    with pytest.raises(WanliteError, match=r"no \*\.safetensors weights"):
        load_local(local(tmp_path, quant="int8"), "fp32", lambda event: None)


def test_a_model_that_is_not_a_chat_model_is_one_line(qwen2, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen2 / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(WanliteError, match=r"^--prompt_extend_model .* cannot be loaded: a vit model is not a chat "
                                           r"model$"):
        extend_prompt(local(tmp_path), "a cat", dtype="fp32")


def test_a_text_model_is_refused_for_an_image(qwen2, picture):
    req = Request(task="tiny-ti2v", prompt="a cat", ckpt_dir=checkpoint_dir("tiny-ti2v"), image=picture,
                  use_prompt_extend=True, prompt_extend_model=str(qwen2))
    with pytest.raises(WanliteError, match="Qwen2.5-VL") as err:
        resolve(req)
    assert err.value.exit_code == 2


def test_model_sizes_are_counted_from_the_config(qwen2, qwen2_vl):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for folder, cls in ((qwen2, AutoModelForCausalLM), (qwen2_vl, AutoModelForImageTextToText)):
        spec = extender_spec(str(folder), (folder / "config.json").read_text())
        assert spec.params == sum(p.numel() for p in cls.from_pretrained(folder).parameters())
        assert spec.vision == (folder == qwen2_vl) and spec.layers == 2
    published = {"Qwen/Qwen2.5-14B-Instruct": 14.77e9, "Qwen/Qwen2.5-7B-Instruct": 7.62e9,
                 "Qwen/Qwen2.5-3B-Instruct": 3.09e9, "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
                 "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9}  # the model cards' parameter counts
    for name, (kind, values) in KNOWN_CONFIGS.items():
        assert extender_spec(name, _config_json(kind, values)).params == pytest.approx(published[name], rel=0.005)


# ------------------------------------------------------------------------------------------------ the job

def test_the_job_carries_both_prompts_and_replay_uses_the_rewrite(qwen2, tmp_path):
    from wanlite.pipelines.replay import recorded_request
    from wanlite.pipelines.video_io import Mp4Writer

    req = Request(task="tiny-t2v", prompt="a red cat", ckpt_dir=checkpoint_dir("tiny-t2v"), seed=3,
                  use_prompt_extend=True, prompt_extend_model=str(qwen2), prompt_extend_target_lang="en")
    job = resolve(req)
    assert job.prompt_extend.device == "cpu" and job.prompt_extend.original_prompt is None
    assert job.prompt_extend.max_new_tokens == 512 and job.prompt_extend.quant == "none"
    job = replace(job, dtype="fp32", prompt_extend=replace(job.prompt_extend, max_new_tokens=4))  # quick
    events = []
    done = extend_job(job, events.append)
    assert done.prompt_extend.original_prompt == "a red cat" and done.settings.prompt != "a red cat"
    assert [e for e in events if e["event"] == "prompt"][0]["extended"] == done.settings.prompt
    assert extend_job(done) is done  # runs once
    record = {"job": done.to_dict()}
    assert record["job"]["prompt_extend"]["original_prompt"] == "a red cat"
    with Mp4Writer(tmp_path / "v.mp4", (16, 16), 16, record) as writer:  # the record as the run writes it
        writer.append(torch.zeros(1, 16, 16, 3, dtype=torch.uint8).numpy())
    replayed = recorded_request(tmp_path / "v.mp4")
    assert replayed.prompt == done.settings.prompt and not replayed.use_prompt_extend
    assert resolve(replayed).prompt_extend is None  # the rewrite is not run again


# ------------------------------------------------------------------------------------------------ dashscope

@pytest.fixture()
def dash(monkeypatch):
    monkeypatch.setenv("DASH_API_KEY", "sk-test")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    def start(mode="ok", delay=5.0):
        context = serve("sk-test", mode, delay)
        stub = context.__enter__()
        monkeypatch.setenv("DASHSCOPE_BASE_URL", stub.base_url)
        started.append(context)
        return stub

    started = []
    yield start
    for context in started:
        context.__exit__(None, None, None)


def hosted(vision=False, lang="zh", **kw) -> PromptExtendPlan:
    return PromptExtendPlan("dashscope", "qwen-vl-max" if vision else "qwen-plus", lang, vision, **kw)


def test_dashscope_answers(dash, picture):
    stub = dash()
    result = extend_prompt(hosted(), "一只猫在雪地里奔跑", seed=7)
    assert result.extended == "A detailed scene from qwen-plus: 一只猫在雪地里奔跑, in soft morning light."
    body = stub.requests[-1]
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPTS[("zh", False)]}
    assert body["seed"] == 7
    result = extend_prompt(hosted(vision=True, lang="en"), "the cat turns its head", picture)
    assert "with an image: the cat turns its head" in result.extended
    image, text = stub.requests[-1]["messages"][1]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,") and text["text"] == "the cat turns its head"
    assert stub.requests[-1]["messages"][0]["content"] == SYSTEM_PROMPTS[("en", True)]


@pytest.mark.parametrize("mode,error,exit_code,match", [
    ("slow", PromptExtendError, 1, "did not answer within 0.3 s"),
    ("malformed", PromptExtendError, 1, "not a chat completion"),
    ("error", PromptExtendError, 1, "HTTP 500: something broke"),
    ("badkey", PromptExtendKeyError, 2, "refused the key in DASH_API_KEY"),
])
def test_dashscope_failures_are_one_line(dash, monkeypatch, mode, error, exit_code, match):
    dash("ok" if mode == "badkey" else mode, delay=2.0)
    if mode == "badkey":
        monkeypatch.setenv("DASH_API_KEY", "sk-wrong")
    with pytest.raises(error, match=match) as err:
        extend_prompt(hosted(timeout_s=0.3), "a cat")
    assert err.value.exit_code == exit_code and "\n" not in str(err.value)


def test_dashscope_unreachable_and_keyless(dash, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DASHSCOPE_BASE_URL", f"http://127.0.0.1:{port}/compatible-mode/v1")
    with pytest.raises(PromptExtendError, match="could not reach DashScope") as err:
        extend_prompt(hosted(timeout_s=2), "a cat")
    assert err.value.exit_code == 1
    monkeypatch.setenv("DASHSCOPE_BASE_URL", "http://example.com/v1")
    with pytest.raises(WanliteError, match="must be an https://"):
        extend_prompt(hosted(), "a cat")
    monkeypatch.delenv("DASH_API_KEY")
    with pytest.raises(PromptExtendKeyError, match="set DASH_API_KEY"):
        extend_prompt(hosted(), "a cat")
    # checked when the job is resolved, before anything loads: one line, exit code 2
    assert main(["plan", "--task", "tiny-t2v", "--ckpt_dir", str(checkpoint_dir("tiny-t2v")),
                 "--use_prompt_extend", "--prompt_extend_method", "dashscope"]) == 2


def test_the_fallback_flag_keeps_the_prompt(dash):
    dash("slow", delay=2.0)
    req = Request(task="tiny-t2v", prompt="a red cat", ckpt_dir=checkpoint_dir("tiny-t2v"), use_prompt_extend=True,
                  prompt_extend_method="dashscope", prompt_extend_timeout=0.3)
    job = resolve(req)
    with pytest.raises(PromptExtendError):
        extend_job(job)
    events = []
    kept = extend_job(resolve(replace(req, prompt_extend_fallback=True)), events.append)
    assert kept.settings.prompt == "a red cat" and "did not answer" in kept.prompt_extend.error
    assert any(e["event"] == "warning" and "--prompt_extend_fallback" in e["message"] for e in events)


def test_a_resumed_run_keeps_the_saved_rewrite_and_does_not_ask_again(dash, tmp_path, monkeypatch):
    import numpy as np

    from wanlite import generate
    from wanlite.errors import Interrupted
    from wanlite.pipelines import resume
    from wanlite.pipelines.video_io import read_mp4_metadata

    stub = dash()
    options = dict(task="tiny-t2v", prompt="a red cat", ckpt_dir=checkpoint_dir("tiny-t2v"), seed=3, frames=5,
                   steps=4, use_prompt_extend=True, prompt_extend_method="dashscope", save_file=tmp_path / "v.mp4")
    clean = generate(**{**options, "save_file": tmp_path / "clean.mp4"}, progress=False)
    monkeypatch.setenv(resume.FAULT_ENV, "sigint@step:3")
    resume._fired.clear()
    with pytest.raises(Interrupted):
        generate(**options, progress=False)
    monkeypatch.delenv(resume.FAULT_ENV)
    asked = len(stub.requests)
    stub.mode = "error"  # asked again, the extender would fail the run
    resumed = generate(**options, progress=False)
    assert len(stub.requests) == asked and np.array_equal(resumed.frames, clean.frames)
    assert resumed.job.settings.prompt == clean.job.settings.prompt != "a red cat"
    assert read_mp4_metadata(resumed.path)["job"]["prompt_extend"]["original_prompt"] == "a red cat"


def test_clean_keeps_one_line():
    assert clean('  "A cat.\n\nIt runs."  ') == "A cat. It runs."
    assert clean("Prompt: a dog") == "a dog" and clean("提示词：一只狗") == "一只狗"


# ------------------------------------------------------------------------------------------------ the plan

def test_the_plan_places_the_extender_like_a_component():
    name, (kind, values) = "Qwen/Qwen2.5-14B-Instruct", KNOWN_CONFIGS["Qwen/Qwen2.5-14B-Instruct"]
    spec = extender_spec(name, _config_json(kind, values))
    work = Workload("t2v-A14B", 832, 480, 81, 40, extender=spec)
    big = make_plan(work, hypothetical(80, 128))
    assert (big.extender_device, big.extender_quant) == ("cuda", "none")
    assert big.predicted.vram_prompt_extender_gb == pytest.approx(
        (extender_bytes(spec) + extender_activation_bytes(spec)) / 1e9, abs=0.01)
    mid = make_plan(work, hypothetical(24, 64))
    assert (mid.extender_device, mid.extender_quant) == ("cuda", "int8")
    assert mid.predicted.peak_vram_gb >= mid.predicted.vram_prompt_extender_gb
    assert any("prompt extender" in r and "int8" in r for r in mid.reasons)
    small = make_plan(work, hypothetical(8, 64))
    assert small.extender_device == "cpu" and small.predicted.vram_prompt_extender_gb == 0
    assert small.predicted.peak_ram_gb >= small.predicted.ram_prompt_extender_gb > 29
    plain = make_plan(replace(work, extender=None), hypothetical(8, 64))
    assert plain.extender_device == "" and plain.predicted.peak_ram_gb < small.predicted.peak_ram_gb
    # int8 decoder layers are quantized as they are read: the load needs the int8 model's RAM, not the bf16 one's
    tight = make_plan(work, hypothetical(24, 32))
    assert (tight.extender_device, tight.extender_quant) == ("cuda", "int8")
    assert tight.predicted.ram_prompt_extender_gb < (extender_bytes(spec) + 3e9) / 1e9
    with pytest.raises(WanliteError, match="smaller --prompt_extend_model"):
        make_plan(work, hypothetical(24, 12))


def test_plan_json_shows_the_extender(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", "--task", "i2v-A14B", "--size", "832*480", "--vram", "16", "--ram", "64",
                     "--use_prompt_extend", "--json"]) == 0
    job = json.loads(out.getvalue())["job"]
    # planning before a download: no image yet, so the text model; 16 GB -> 14B's decoder layers in Q4_K
    assert job["prompt_extend"]["model"] == "Qwen/Qwen2.5-14B-Instruct"
    assert (job["prompt_extend"]["device"], job["prompt_extend"]["quant"]) == ("cuda", "gguf-q4_k")
    assert job["predicted"]["vram_prompt_extender_gb"] > 10
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", "--task", "i2v-A14B", "--size", "832*480", "--vram", "16", "--ram", "64",
                     "--use_prompt_extend", "--prompt_extend_model", "QwenVL2.5_3B"]) == 0
    assert "prompt extender" in out.getvalue()
