"""`--use_prompt_extend`: a chat model rewrites a short prompt into the long, detailed kind the Wan models were
trained on, before anything else runs.

Two methods, as in the official generate.py:
- `local_qwen`: a Qwen2.5 instruct model (a Qwen2.5-VL model when an image goes with the prompt) through
  transformers, loaded from a folder or the Hugging Face cache (never downloaded, never remote code), placed by
  the planner like every other component (`Plan.extender_device` / `extender_quant`) and released afterwards;
  greedy decoding, so the same prompt gives the same rewrite;
- `dashscope`: Alibaba Cloud's hosted Qwen models over HTTPS (the OpenAI-compatible endpoint), the key from
  `DASH_API_KEY`, the endpoint from `DASHSCOPE_BASE_URL` (default: the mainland one).

Resolve calls `plan_extender` (checks the flags, finds the model and its size for the planner) and `placed`
(the plan's device and format); the run calls `extend_job` first, which returns the job with the rewritten
prompt in its settings and the user's in `job.prompt_extend.original_prompt`. Any failure is one line
(`PromptExtendError`; exit code 1, 2 for a rejected or missing key) unless `--prompt_extend_fallback` asked to
go on with the user's prompt.
"""
from __future__ import annotations

import json
import os
import re
import time
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from wanlite.errors import WanliteError
from wanlite.hf_folders import refuse_remote_code
from wanlite.pipelines.job import Job, PromptExtendPlan
from wanlite.planner.estimate import ExtenderSpec

Progress = Callable[[dict], None]

METHODS = ("local_qwen", "dashscope")
LANGS = ("zh", "en")
# the official defaults: (method, an image goes with the prompt) -> model
DEFAULT_MODELS = {("local_qwen", False): "Qwen/Qwen2.5-14B-Instruct",
                  ("local_qwen", True): "Qwen/Qwen2.5-VL-7B-Instruct", ("dashscope", False): "qwen-plus", ("dashscope", True): "qwen-vl-max"}
# the official generate.py's short names for the local models
ALIASES = {"Qwen2.5_3B": "Qwen/Qwen2.5-3B-Instruct", "Qwen2.5_7B": "Qwen/Qwen2.5-7B-Instruct",
           "Qwen2.5_14B": "Qwen/Qwen2.5-14B-Instruct", "QwenVL2.5_3B": "Qwen/Qwen2.5-VL-3B-Instruct",
           "QwenVL2.5_7B": "Qwen/Qwen2.5-VL-7B-Instruct"}
DASHSCOPE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"  # international: dashscope-intl.aliyuncs.com
MAX_NEW_TOKENS = 512  # the rewrite asks for ~100 words (~200 Chinese characters); this bounds a runaway answer
VL_MAX_PIXELS = 1280 * 28 * 28  # the image is scaled down to this before a VL model sees it (~1 Mpx, 1280 tokens)
IMAGE_PAD = "<|image_pad|>"  # where a Qwen-VL chat template puts the image's tokens
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Configs of the official local defaults, to plan before they are downloaded (published config.json values).
_QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
_QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-14B-Instruct": ("qwen2", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                                num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                                                tie_word_embeddings=False)),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", _QWEN25_7B),
    "Qwen/Qwen2.5-3B-Instruct": ("qwen2", _QWEN25_3B),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", dict(text_config=_QWEN25_7B,
                                                       vision_config={**_VISION, "out_hidden_size": 3584})),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", dict(text_config=_QWEN25_3B, tie_word_embeddings=True,
                                                       vision_config={**_VISION, "out_hidden_size": 2048})),
}

# The instructions the model rewrites with, by (target language, an image goes with the prompt). They ask for
# what the official ones ask for: one detailed description in the target language that keeps the user's
# subjects and motion and adds the look, setting, light and camera the training captions describe.
SYSTEM_PROMPTS = {
    ("en", False): (
        "You turn short requests into prompts for a text-to-video model that was trained on long, precise "
        "captions. Rewrite the user's prompt as one paragraph in English of about 80 to 120 words. Keep "
        "everything the user asked for: the same subjects and how many there are, what they do and which way "
        "they move, any words that must appear on screen, and any style the user named. Add the visual detail a "
        "caption would give: how the subjects look and what they wear, where the scene takes place and when, "
        "the light and the colours, how the camera frames the shot and whether it moves, and the overall style "
        "(a realistic photograph unless the user says otherwise). Describe only what can be seen. Do not add a "
        "story, new main characters or a different action. Whatever language the request is in, answer in "
        "English. Reply with the rewritten prompt alone: no heading, no quotation marks, no comments."),
    ("zh", False): (
        "你负责把用户简短的描述改写成文生视频模型所需的提示词，该模型是用详细、准确的画面描述训练的。请用中文把用户的"
        "描述改写成一段约 100 到 200 字的文字。保留用户要求的一切：相同的主体及其数量、主体的动作和运动方向、需要出现"
        "在画面中的文字，以及用户指定的风格。补充画面描述应有的细节：主体的外貌和衣着、场景的地点和时间、光线与色彩、"
        "镜头的景别与运动方式，以及整体风格（用户没有指定时为写实摄影风格）。只描述看得见的内容，不要编造情节，不要"
        "增加新的主要角色，也不要改变动作。无论用户使用哪种语言，都用中文回答。只输出改写后的提示词，不要标题、"
        "引号或任何解释。"),
    ("en", True): (
        "You turn short requests into prompts for an image-to-video model. The attached image is the first frame "
        "of the video and the user's prompt says what should happen in it. Write one paragraph in English of "
        "about 80 to 120 words: first describe what the image shows (its subjects, how they look, the setting, "
        "the light and the style) as it is, then describe the motion the user asked for, the same subjects doing "
        "the same action in the same direction, and how the camera moves, if it does. Never contradict the "
        "image and never replace the user's action with another one. Describe only what can be seen. Whatever "
        "language the request is in, answer in English. Reply with the rewritten prompt alone: no heading, no "
        "quotation marks, no comments."),
    ("zh", True): (
        "你负责把用户简短的描述改写成图生视频模型所需的提示词。附带的图片是视频的第一帧，用户的描述说明画面中应当发生"
        "什么。请用中文写一段约 100 到 200 字的文字：先如实描述图片的内容（主体、外貌、场景、光线和风格），再描述用户"
        "要求的运动，即同样的主体做同样的动作、朝同样的方向运动，以及镜头是否运动、如何运动。不要与图片内容矛盾，"
        "也不要把用户要求的动作换成别的动作。只描述看得见的内容。无论用户使用哪种语言，都用中文回答。只输出改写后的"
        "提示词，不要标题、引号或任何解释。"),
}


class PromptExtendError(WanliteError):
    """The rewrite failed: the service did not answer, answered an error or nonsense, or the model failed."""

    exit_code = 1


class PromptExtendKeyError(PromptExtendError):
    """DashScope has no key (DASH_API_KEY unset) or refused it: the user's to fix."""

    exit_code = 2


@dataclass(frozen=True)
class ExtendedPrompt:
    original: str
    extended: str
    method: str
    model: str


# ------------------------------------------------------------------------------------------------ resolve

def plan_extender(req, vision: bool, without_files: bool = False
                  ) -> tuple[PromptExtendPlan, ExtenderSpec | None] | None:
    """The request's prompt extension before placement, and the local model's size for the planner (None for
    DashScope, whose model runs elsewhere); None when `--use_prompt_extend` is off. `vision`: an image goes with
    the prompt. Raises WanliteError (exit 2) for unknown values, a local model that is not here (unless only
    planning, `without_files`, for an official default) or a missing DASH_API_KEY."""
    if not req.use_prompt_extend:
        return None
    method, lang = req.prompt_extend_method, req.prompt_extend_target_lang
    if method not in METHODS:
        raise WanliteError(f"--prompt_extend_method {method!r} is unknown; choose local_qwen or dashscope")
    if lang not in LANGS:
        raise WanliteError(f"--prompt_extend_target_lang {lang!r} is unknown; choose zh or en")
    if not req.prompt_extend_timeout > 0:
        raise WanliteError(f"--prompt_extend_timeout {req.prompt_extend_timeout} must be a positive number of seconds")
    model = req.prompt_extend_model or DEFAULT_MODELS[(method, vision)]
    plan = PromptExtendPlan(method, model, lang, vision, fallback=req.prompt_extend_fallback,
                            timeout_s=float(req.prompt_extend_timeout), max_new_tokens=MAX_NEW_TOKENS)
    if method == "dashscope":
        if not os.environ.get("DASH_API_KEY") and not without_files and not req.prompt_extend_fallback:
            raise WanliteError("--prompt_extend_method dashscope needs an API key: set DASH_API_KEY (Alibaba Cloud "
                               "Model Studio), or use --prompt_extend_method local_qwen")
        base_url()  # a bad DASHSCOPE_BASE_URL fails now
        return plan, None
    model = ALIASES.get(model, model)
    folder = model_folder(model)
    if folder is None:
        if not without_files or model not in KNOWN_CONFIGS:
            raise WanliteError(f"--prompt_extend_model {model}: not in the Hugging Face cache and not a folder; "
                               f"download it (`hf download {model}`) or pass the folder of a Qwen2.5 instruct model")
        kind, values = KNOWN_CONFIGS[model]
        spec = extender_spec(model, _config_json(kind, values))
    else:
        model = str(folder) if Path(model).expanduser().is_dir() else model
        spec = extender_spec(model, (Path(folder) / "config.json").read_text(encoding="utf-8"))
    if vision and not spec.vision:
        raise WanliteError(f"--prompt_extend_model {model} reads text only, and this request has an image; give a "
                           "Qwen2.5-VL model (e.g. QwenVL2.5_7B), or none for the default")
    return replace(plan, model=model), spec


def placed(plan: PromptExtendPlan, placement, device) -> PromptExtendPlan:
    """The plan's device and format for a local model (`placement`: the planner's `Placement`); a task the
    planner does not plan (the tiny ones) runs it where the job runs, in bf16."""
    if plan.method != "local_qwen":
        return plan
    if placement.extender_device:
        return replace(plan, device=placement.extender_device, quant=placement.extender_quant)
    return replace(plan, device=str(device), quant="none")


def model_folder(name: str) -> Path | None:
    """A local model folder, or the snapshot of a repo id in the Hugging Face cache (None: not cached)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WanliteError(f"--prompt_extend_model {name}: the folder has no config.json; give the folder of a "
                               "transformers model (config.json, tokenizer files, *.safetensors)")
        return path
    if not REPO_ID.match(name):
        raise WanliteError(f"--prompt_extend_model {name}: no such folder, and not a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _config_json(kind: str, values: dict) -> str:
    return json.dumps({"model_type": kind, **values}, sort_keys=True)


@lru_cache(maxsize=16)
def extender_spec(name: str, config_json: str) -> ExtenderSpec:
    """The size of the model `config_json` describes, counted on the model built on meta (exact for any
    architecture transformers knows; nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    values = json.loads(config_json)
    config = AutoConfig.for_model(**values)
    vision = getattr(config, "vision_config", None) is not None
    with torch.device("meta"):
        model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_config(config)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ExtenderSpec(name=name, params=sum(p.numel() for p in model.parameters()),
                        linear_params=sum(m.weight.numel() for n, m in model.named_modules() if decoder_linear(n, m)),
                        layers=text.num_hidden_layers, kv_dim=text.num_key_value_heads * head_dim,
                        intermediate=text.intermediate_size, vocab=text.vocab_size, vision=vision)


def decoder_linear(name: str, module) -> bool:
    """What a quantized extender quantizes: the Linears of the language model's decoder layers (embeddings,
    head, norms and the vision tower stay in bf16)."""
    from torch import nn

    return isinstance(module, nn.Linear) and re.search(r"(^|\.)layers\.\d+\.", name) is not None \
        and not re.search(r"(^|\.)visual\.", name)


def base_url() -> str:
    """DashScope's OpenAI-compatible endpoint: `DASHSCOPE_BASE_URL`, else the default. The key travels only over
    HTTPS (plain http only to this machine, e.g. a local stand-in)."""
    from urllib.parse import urlparse

    url = os.environ.get("DASHSCOPE_BASE_URL", DASHSCOPE_URL).rstrip("/")
    parts = urlparse(url)
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and local):
        raise WanliteError(f"DASHSCOPE_BASE_URL {url!r} must be an https:// URL (e.g. {DASHSCOPE_URL})")
    return url


# ------------------------------------------------------------------------------------------------ run

def extend_job(job: Job, emit: Progress = lambda event: None) -> Job:
    """Run the job's prompt extension (when it has one that has not run yet) and return the job with the
    rewritten prompt in its settings and the user's in `prompt_extend.original_prompt`. With
    `--prompt_extend_fallback` a failure is a warning and the user's prompt stays."""
    plan = job.prompt_extend
    if plan is None or plan.original_prompt is not None:
        return job
    settings = job.settings
    emit({"event": "stage", "name": f"extend prompt ({plan.method} {plan.model})"})
    image = Path(settings.image) if plan.vision and settings.image is not None else None
    try:
        result = extend_prompt(plan, settings.prompt, image, dtype=job.dtype, seed=settings.seed, emit=emit)
    except PromptExtendError as exc:
        if not plan.fallback:
            raise
        emit({"event": "warning", "message": f"{exc}; going on with the prompt as given (--prompt_extend_fallback)"})
        return replace(job, prompt_extend=replace(plan, original_prompt=settings.prompt, error=str(exc)))
    emit({"event": "prompt", "original": result.original, "extended": result.extended,
          "message": f"prompt: {result.original}\nextended prompt ({plan.method} {plan.model}): {result.extended}"})
    return replace(job, settings=replace(settings, prompt=result.extended),
                   prompt_extend=replace(plan, original_prompt=settings.prompt))


def extend_prompt(plan: PromptExtendPlan, prompt: str, image: Path | None = None, dtype: str = "bf16",
                  seed: int = 0, emit: Progress = lambda event: None) -> ExtendedPrompt:
    """Rewrite `prompt` (with `image` for a VL model) as `plan` says; raises PromptExtendError."""
    if plan.method == "dashscope":
        text = dashscope_chat(plan, prompt, image, seed)
    else:
        text = local_chat(plan, prompt, image, dtype, emit)
    extended = clean(text)
    if not extended:
        raise PromptExtendError(f"the prompt extender ({plan.method} {plan.model}) answered an empty prompt")
    return ExtendedPrompt(prompt, extended, plan.method, plan.model)


def clean(text: str) -> str:
    """One line: whitespace runs collapsed, a wrapping pair of quotes or a leading 'Prompt:' label dropped."""
    text = " ".join(text.split())
    text = re.sub(r"^(rewritten prompt|extended prompt|prompt|提示词)\s*[:：]\s*", "", text, flags=re.IGNORECASE)
    for left, right in (('"', '"'), ("'", "'"), ("“", "”"), ("「", "」"), ("`", "`")):
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[len(left): -len(right)].strip()
    return text


def messages(plan: PromptExtendPlan, prompt: str, image_part: dict | None = None) -> list[dict]:
    """The chat: our instructions, then the user's prompt (after the image, for a VL model)."""
    system = SYSTEM_PROMPTS[(plan.target_lang, plan.vision)]
    user = prompt if image_part is None else [image_part, {"type": "text", "text": prompt}]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def small_image(path: Path):
    """The image as RGB, scaled down to at most VL_MAX_PIXELS."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    if w * h > VL_MAX_PIXELS:
        scale = (VL_MAX_PIXELS / (w * h)) ** 0.5
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.LANCZOS)
    return img


def local_chat(plan: PromptExtendPlan, prompt: str, image: Path | None, dtype: str, emit: Progress) -> str:
    """Load the local model where the plan puts it, rewrite greedily, release it."""
    import torch

    from wanlite.offload.experts import release

    try:
        model, tokenizer, images = load_local(plan, dtype, emit)
    except (OSError, ValueError, KeyError) as exc:  # files missing or not a model transformers knows
        raise WanliteError(f"--prompt_extend_model {plan.model} cannot be loaded: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    try:
        device = torch.device(plan.device or "cpu")
        if images is not None and image is not None:
            # the processor's work done here (its video half needs torchvision): the image's patches, and the
            # template's one image placeholder repeated once per merged patch, as the model expects
            pixels = dict(images(images=[small_image(image)], return_tensors="pt"))
            n = int(pixels["image_grid_thw"][0].prod()) // images.merge_size ** 2
            text = tokenizer.apply_chat_template(messages(plan, prompt, {"type": "image"}), tokenize=False,
                                                 add_generation_prompt=True)
            if text.count(IMAGE_PAD) != 1:
                raise ValueError(f"the chat template of {plan.model} does not place the image ({IMAGE_PAD})")
            inputs = {**tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * n), return_tensors="pt"), **pixels}
        else:
            inputs = dict(tokenizer.apply_chat_template(messages(plan, prompt), add_generation_prompt=True,
                                                        return_tensors="pt", return_dict=True))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        from transformers import GenerationConfig

        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        greedy = GenerationConfig(do_sample=False, max_new_tokens=plan.max_new_tokens, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                                  (eos[0] if isinstance(eos, list) else eos))
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=greedy)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    except (RuntimeError, ValueError) as exc:  # out of memory, a broken template, ...
        raise PromptExtendError(f"the prompt extender {plan.model} failed: {str(exc).splitlines()[0][:200]}") \
            from None
    finally:
        release(model)


def load_local(plan: PromptExtendPlan, dtype: str, emit: Progress):
    """(model, tokenizer, image processor or None) from the folder / cache, in `dtype` (fp16 on the CPU: bf16),
    the decoder layers quantized as the plan says (wanlite.quant, as every other component) while they load, on
    its device."""
    import torch
    from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig,
                              AutoImageProcessor, AutoTokenizer)

    from wanlite.offload.experts import release
    from wanlite.pipelines.job import DTYPES
    from wanlite.quant import parse_quant

    folder = model_folder(plan.model)
    if folder is None:
        raise WanliteError(f"--prompt_extend_model {plan.model}: not in the Hugging Face cache; download it "
                           f"(`hf download {plan.model}`) or pass its folder")
    dtype = DTYPES.get(dtype, torch.bfloat16)
    if plan.device.startswith("cpu") and dtype == torch.float16:
        dtype = torch.bfloat16
    refuse_remote_code(Path(folder), "prompt extender")
    options = dict(dtype=dtype, trust_remote_code=False, local_files_only=True)
    files = sorted(Path(folder).glob("*.safetensors"))
    vision = "vision_config" in json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    if tokenizer.chat_template is None:  # some VL repos keep it beside the processor only
        for name in ("chat_template.jinja", "chat_template.json"):
            if (Path(folder) / name).is_file():
                text = (Path(folder) / name).read_text(encoding="utf-8")
                tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
    images = None
    if vision and plan.vision:
        images = AutoImageProcessor.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    started = time.perf_counter()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    kinds = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING if vision else MODEL_FOR_CAUSAL_LM_MAPPING
    if type(config) not in kinds:
        raise ValueError(f"a {config.model_type} model is not a chat model")
    kind = kinds[type(config)]
    if plan.quant in ("", "none"):
        model = kind.from_pretrained(folder, config=config, **options)
    else:
        model = load_quantized(kind, Path(folder), config, files, parse_quant(plan.quant), options)
    try:
        model.to(plan.device or "cpu")
    except RuntimeError as exc:  # out of memory on the device
        release(model)
        raise PromptExtendError(f"the prompt extender {plan.model} does not fit on {plan.device}: "
                                f"{str(exc).splitlines()[0][:160]}") from None
    emit({"event": "loaded", "what": f"prompt extender ({plan.quant or 'none'})",
          "bytes": sum(f.stat().st_size for f in files), "seconds": time.perf_counter() - started})
    return model.eval().requires_grad_(False), tokenizer, images


def load_quantized(kind, folder: Path, config, files: list[Path], quant, options: dict):
    """`kind.from_pretrained` with the decoder Linears quantized to `quant` as they arrive, each weight read from
    its file into memory of its own and freed once quantized (transformers would map the files, and a mapped
    file's pages stay resident while any tensor from it, e.g. the embeddings, lives)."""
    from safetensors import safe_open
    from transformers import GenerationConfig

    if not files:
        raise WanliteError(f"--prompt_extend_model {folder}: no *.safetensors weights; a quantized prompt extender "
                           "is read from safetensors files (convert the folder with transformers' save_pretrained)")
    with ExitStack() as opened:
        weights = {}
        for path in files:
            handle = opened.enter_context(safe_open(path, framework="pt", backend="pread"))
            weights.update({key: handle.get_slice(key) for key in handle.keys()})
        model = quantized_on_arrival(lambda: kind.from_pretrained(None, config=config, state_dict=weights, **options),
                                     quant, decoder_linear)
    if (folder / "generation_config.json").is_file():  # from_pretrained reads it only from a folder
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model


def quantized_on_arrival(load: Callable, config, chosen: Callable):
    """`load()` (a transformers `from_pretrained`) with each weight of the Linears `chosen(name, module)` picks
    quantized the moment transformers sets it: `config`'s handler builds the module that replaces the Linear
    and the Linear keeps a stand-in (one value, expanded to the weight's shape), so one full-precision weight
    of those is alive at a time instead of all of them. The modules are swapped in after loading."""
    import torch
    from torch import nn
    from torch.nn.modules import module as torch_module

    from wanlite.quant import HANDLERS
    from wanlite.quant.base import linear_from, set_submodule

    parents = weakref.WeakKeyDictionary()  # module -> (parent, attribute): a module's name while it is built
    quantized = weakref.WeakKeyDictionary()  # Linear -> its quantized replacement

    def registered(parent, name, child):
        if child is not None:
            parents[child] = (parent, name)

    def name_of(module) -> str:
        parts = []
        while module in parents:
            module, part = parents[module]
            parts.append(part)
        return ".".join(reversed(parts))

    def arrived(module, name, param):
        if name != "weight" or param is None or param.is_meta or not chosen(name_of(module), module):
            return None
        quantized[module] = HANDLERS[type(config)](linear_from(param.detach(), None), config)
        stand_in = nn.Parameter(torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape),
                                requires_grad=False)
        # transformers marks what it loaded so that its init pass leaves it alone
        stand_in._is_hf_initialized = getattr(param, "_is_hf_initialized", False)
        return stand_in

    hooks = [torch_module.register_module_module_registration_hook(registered),
             torch_module.register_module_parameter_registration_hook(arrived)]
    # transformers' loader threads would read every tensor ahead of the weights set so far: one at a time here
    async_load = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        model = load()
    finally:
        for hook in hooks:
            hook.remove()
        if async_load is None:
            del os.environ["HF_DEACTIVATE_ASYNC_LOAD"]
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = async_load
    for name, module in list(model.named_modules()):
        replacement = quantized.get(module)
        if replacement is not None:
            if module.bias is not None:
                replacement.bias = module.bias
            set_submodule(model, name, replacement)
        elif chosen(name, module):  # its weight came some other way than a module attribute: quantized now
            set_submodule(model, name, HANDLERS[type(config)](module, config))
    return model


def dashscope_chat(plan: PromptExtendPlan, prompt: str, image: Path | None, seed: int = 0) -> str:
    """One chat completion from DashScope's OpenAI-compatible endpoint; every failure a one-line
    PromptExtendError (PromptExtendKeyError for a missing or refused key)."""
    import base64
    import io
    import socket
    import urllib.error
    import urllib.request

    key = os.environ.get("DASH_API_KEY", "")
    if not key:
        raise PromptExtendKeyError("--prompt_extend_method dashscope needs an API key: set DASH_API_KEY")
    url = base_url() + "/chat/completions"
    part = None
    if image is not None:
        png = io.BytesIO()
        small_image(image).save(png, format="PNG")
        part = {"type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}}
    body = {"model": plan.model, "messages": messages(plan, prompt, part), "seed": seed % 2**31}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    where = f"DashScope ({url})"
    try:
        with urllib.request.urlopen(request, timeout=plan.timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc.read())
        if exc.code in (401, 403):
            raise PromptExtendKeyError(f"{where} refused the key in DASH_API_KEY (HTTP {exc.code}{detail}); check "
                                       "the key and its region (DASHSCOPE_BASE_URL)") from None
        raise PromptExtendError(f"{where} answered HTTP {exc.code}{detail}") from None
    except (TimeoutError, socket.timeout):
        raise PromptExtendError(f"{where} did not answer within {plan.timeout_s:g} s") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise PromptExtendError(f"{where} did not answer within {plan.timeout_s:g} s") from None
        raise PromptExtendError(f"could not reach {where}: {exc.reason}") from None
    except OSError as exc:  # the connection dropped mid-answer
        raise PromptExtendError(f"{where}: the connection failed ({exc})") from None
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise TypeError(type(content).__name__)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise PromptExtendError(f"{where} answered something that is not a chat completion: "
                                f"{raw[:80]!r}") from None
    return content


def _error_detail(raw: bytes) -> str:
    """': message' from an error body (OpenAI-compatible or DashScope-native), one line, or ''."""
    try:
        data = json.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
    except ValueError:
        message = None
    return "" if not message else ": " + " ".join(str(message).split())[:160]
