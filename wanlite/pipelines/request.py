"""A generation request, validated once into resolved settings with one-line errors (exit code 2)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from wanlite.errors import WanliteError
from wanlite.specs import TASKS, TaskSpec

SOLVERS = ("unipc", "dpm++", "euler")

# What a request may ask for at most, checked before anything is loaded. The official sizes top out at 1280 px
# a side and 121 frames; the DiT's rotary table has 1024 positions per latent axis (16384 px, 4093 frames), but
# attention grows with the square of the tokens, so far below that a request is a typo, not a video.
MAX_SIDE = 4096  # px a side: 3.2x the largest official size; 4096*4096*81 frames is already 1.4 M tokens
MAX_FRAMES = 1001  # 4k+1; 251 latent frames, well inside the rotary table
MAX_STEPS = 1000  # the schedules discretize 1000 training timesteps; more steps only repeat them
MAX_CLIPS = 1000  # S2V clips (about 5 s each)
MAX_SEED = 2**63 - 1  # torch.Generator takes 64 bits; clips / segments add their index to the seed
MAX_IMAGE_PIXELS = 8192 * 8192  # an input image is refused from its header, before it is decoded
RELIGHTING_LORA = "relighting_lora.ckpt"  # Animate-14B's LoRA for lighting the character into the scene


@dataclass(frozen=True)
class Request:
    """What the user asked for; None means the task's official default."""

    task: str
    prompt: str
    ckpt_dir: Path | None = None
    negative_prompt: str | None = None
    image: Path | None = None
    size: tuple[int, int] | None = None  # (width, height)
    frames: int | None = None
    steps: int | None = None
    shift: float | None = None
    guide_scale: tuple[float, float] | None = None  # (low noise, high noise)
    solver: str | None = None
    seed: int = -1
    device: str = "auto"
    dtype: str = "auto"  # the transformer's compute dtype: auto (bf16; fp16 on GPUs without bf16) | bf16 | fp16 | fp32
    save_file: Path | None = None
    overwrite: bool = False  # --save_file may replace an existing file
    output_dir: Path = Path("outputs")
    preview: bool = False
    t5_cpu: bool = False
    quant: str = "auto"  # "auto" keeps what the files store; see wanlite.quant.QUANT_CHOICES
    quant_backend: str = "torchao"  # int8 only: torchao | bnb | quanto
    vae_tile: int | None = None  # latent pixels per VAE tile; None: tile frames larger than the default, 0: off
    vae_dtype: str = "fp32"  # the VAE decode: fp32 (official) or bf16 (half the memory; bench/results/vae_bf16.json)
    profile: str = "auto"  # auto (measure + plan) | a shipped profile name | a .toml path (wanlite.planner)
    # None below means "as the plan says"
    offload: str = "auto"  # auto | none | model | block (wanlite.offload)
    resident_blocks: int | None = None  # block offload: blocks kept on the device
    prefetch: int | None = None  # block offload: blocks copied ahead of the one computing
    ram_mode: str | None = None  # block offload: pinned | mmap | disk
    chunk_tokens: int | None = None  # DiT blocks work this many tokens at a time (0: whole)
    offload_cache: Path | None = None  # disk mode's cache folder (default: the user cache folder)
    # step cache: auto (the profile's, else off) | off | safe | fast | turbo | dbcache | taylorseer | mag | calibrate,
    # or a CacheConfig
    cache: object = "auto"
    cache_threshold: float | None = None  # None below: the preset's value
    cache_fn: int | None = None  # DBCache front blocks
    cache_bn: int | None = None  # DBCache back blocks
    taylorseer_order: int | None = None
    cache_force: bool = False  # cache even distilled (<= 8 step) schedules
    lora: tuple[str, ...] = ()  # FILE[:STRENGTH], on every expert
    lora_high: tuple[str, ...] = ()  # A14B: on the high-noise expert only
    lora_low: tuple[str, ...] = ()
    lora_mode: str = "auto"  # auto | merge | runtime (wanlite.lora)
    preset: str | None = None  # a sampling recipe (wanlite.lora.PRESETS: lightning); explicit flags still win
    # S2V: the speech (any file with an audio track), an optional pose video, how many clips at most (default:
    # as many as the audio covers), and whether the motion history starts from the reference image
    audio: Path | None = None
    pose_video: Path | None = None
    num_clip: int | None = None
    start_from_ref: bool = False
    wav2vec: Path | None = None  # the wav2vec2 folder, when not inside ckpt_dir
    # Animate: the preprocessed folder (src_pose.mp4, src_face.mp4, src_ref.png [, src_bg.mp4, src_mask.mp4]),
    # replacement instead of animation, and the frames each segment overlaps the previous one
    src_root_path: Path | None = None
    replace: bool = False
    refert_num: int = 1
    relighting_lora: bool = False  # Animate: apply the checkpoint's relighting_lora.ckpt (for replacement)
    attention: str = "auto"  # auto (PyTorch SDPA) | sdpa | flash (flash-attn) | sage (SageAttention)
    cfg: str = "auto"  # auto (the plan's) | batched (cond + uncond as a batch of 2) | per_block (one after the other)
    compile: bool = False  # torch.compile each DiT block (shapes fixed per run); off by default
    # --use_prompt_extend: a chat model rewrites the prompt first (wanlite.pipelines.prompt_extend)
    use_prompt_extend: bool = False
    prompt_extend_method: str = "local_qwen"  # local_qwen | dashscope
    prompt_extend_model: str | None = None  # None: the method's official default (a VL model with an image)
    prompt_extend_target_lang: str = "zh"  # zh | en
    prompt_extend_fallback: bool = False  # a failed rewrite warns and keeps the prompt instead of stopping
    prompt_extend_timeout: float = 60.0  # dashscope: seconds to wait for the answer
    # component files overriding what ckpt_dir provides (ComfyUI-style folders of separate files)
    high_noise_model: Path | None = None
    low_noise_model: Path | None = None
    dit: Path | None = None
    t5: Path | None = None
    vae: Path | None = None
    resume: Path | None = None  # a resume file (`<output>.resume.pt`): continue its generation (resume.py)
    # several GPUs, launched by torchrun (wanlite.parallel): the DiT's tokens split over this many ranks, and the
    # transformer's / text encoder's weights sharded over them
    ulysses_size: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    def component_files(self) -> dict[str, Path]:
        return {flag: Path(getattr(self, flag)) for flag in ("high_noise_model", "low_noise_model", "dit", "t5", "vae")
                if getattr(self, flag) is not None}


# the official generate.py names of Request fields, accepted by the Python API as by the command line
OFFICIAL_NAMES = {"frame_num": "frames", "sample_steps": "steps", "sample_shift": "shift",
                  "sample_guide_scale": "guide_scale", "sample_solver": "solver", "base_seed": "seed",
                  "use_relighting_lora": "relighting_lora", "replace_flag": "replace"}


def request_with(base: Request, **options) -> Request:
    """`base` with `options` put over it, in the forms a person types them: `size="1280*720"` or (1280, 720),
    `guide_scale=3.5` or (3, 4) or "3,4", a path as str or Path, `lora="a.safetensors:0.8"` or a list; the
    official names (`base_seed`, `frame_num`, ...) as aliases. An unknown name is an error (exit code 2)."""
    from dataclasses import fields, replace

    known = {f.name: f for f in fields(Request)}
    changes = {}
    for name, value in options.items():
        field_name = OFFICIAL_NAMES.get(name, name)
        if field_name not in known:
            close = sorted(n for n in known if n.startswith(field_name[:3]))
            raise WanliteError(f"unknown option {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                            "; see help(wanlite.Request) for the options"))
        changes[field_name] = _typed(field_name, str(known[field_name].type), value)
    return replace(base, **changes)


def _typed(name: str, annotation: str, value):
    if value is None:
        return None
    if name == "size" and isinstance(value, str):
        return parse_size(value)
    if name == "guide_scale":
        values = [float(v) for v in value.split(",")] if isinstance(value, str) else (
            list(value) if isinstance(value, (tuple, list)) else [float(value)])
        if len(values) not in (1, 2):
            raise WanliteError(f"guide_scale {value!r} must be a number or (low, high)")
        return (float(values[0]), float(values[-1]))
    if annotation.startswith("tuple[str"):
        return (str(value),) if isinstance(value, (str, Path)) else tuple(str(v) for v in value)
    if annotation.startswith("tuple[int"):
        return tuple(int(v) for v in value)
    if annotation.startswith("Path"):
        return Path(value)
    return value


@dataclass(frozen=True)
class Settings:
    """Resolved generation settings: written into the mp4 and enough to reproduce the video."""

    task: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    shift: float
    guide_scale: tuple[float, float]
    solver: str
    size: tuple[int, int]
    frames: int
    fps: int
    image: str | None = None
    boundary: float | None = None  # the A14B expert switch (t >= boundary * 1000: high noise); None: the task's
    # (t_from, guide, lora_gain) while t >= t_from, the first that matches (a preset's phases); else guide_scale
    # and LoRAs at full strength
    phases: tuple = ()
    audio: str | None = None  # S2V (frames: per clip)
    pose_video: str | None = None
    num_clip: int | None = None
    start_from_ref: bool = False
    src_root_path: str | None = None  # Animate (frames: per segment)
    replace: bool = False
    refert_num: int = 1
    relighting_lora: bool = False
    preset: str | None = None  # the sampling recipe the steps, shift, guidance, boundary and phases came from

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str) -> tuple[int, int]:
    """'1280*720' (official) or '1280x720' -> (width, height)."""
    for sep in ("*", "x", "X"):
        if sep in text:
            w, _, h = text.partition(sep)
            if w.strip().isdigit() and h.strip().isdigit():
                return int(w), int(h)
    raise WanliteError(f"--size {text!r} is not WIDTH*HEIGHT, e.g. 1280*720")


def nearest_multiples(value: int, step: int) -> str:
    low = value // step * step
    return str(step) if low < step else f"{low} or {low + step}"


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise WanliteError(f"unknown --task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def check_size(task: TaskSpec, size: tuple[int, int]) -> None:
    stride = task.stride
    w, h = size
    bad = [(side, v) for side, v in (("width", w), ("height", h)) if v <= 0 or v % stride]
    if bad:
        side, v = bad[0]
        raise WanliteError(f"--size {w}*{h}: {side} {v} is not a multiple of {stride} for {task.name}; "
                           f"nearest valid {side}s: {nearest_multiples(v, stride)}")


def check_limits(req: Request, size: tuple[int, int], frames: int) -> None:
    """Absurd requests (a typo, a script's overflow) are refused before any work, naming the limit."""
    if max(size) > MAX_SIDE:
        raise WanliteError(f"--size {size[0]}*{size[1]}: at most {MAX_SIDE} px a side (the official sizes are "
                           "up to 1280*720)")
    if frames > MAX_FRAMES:
        raise WanliteError(f"--frame_num {frames}: at most {MAX_FRAMES} frames in one video")
    if req.num_clip is not None and req.num_clip > MAX_CLIPS:
        raise WanliteError(f"--num_clip {req.num_clip}: at most {MAX_CLIPS} clips")
    if req.seed > MAX_SEED:
        raise WanliteError(f"--base_seed {req.seed}: at most {MAX_SEED} (2^63 - 1); -1 draws a random seed")


def check_image(path: Path) -> None:
    """The image exists and its header's size is within MAX_IMAGE_PIXELS; the pixels are not decoded here."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise WanliteError(f"--image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
    except Image.DecompressionBombError:  # PIL refuses twice its own limit (179 Mpx) itself: far past ours
        w, h = None, None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise WanliteError(f"--image {path} is not a readable image ({type(exc).__name__}); use PNG, JPEG or WebP")\
            from None
    if w is None or w * h > MAX_IMAGE_PIXELS:
        what = "far more" if w is None else f"{w}*{h} px is more"
        raise WanliteError(f"--image {path}: {what} than the limit of {MAX_IMAGE_PIXELS // 10**6} Mpx; downscale it "
                           "(the video is at most 1280 px a side)")


def check_save_file(path: Path | None, overwrite: bool) -> None:
    """Checked where a generation decides its output (a Pipeline may also return frames only)."""
    if path is not None and Path(path).exists() and not overwrite:
        raise WanliteError(f"--save_file {path} already exists; pass --overwrite to replace it, or another name")


def check_finite(flag: str, values) -> None:
    if not all(math.isfinite(v) for v in values):
        shown = ",".join(dict.fromkeys(str(v) for v in values))  # (inf, inf) from one typed value: "inf"
        raise WanliteError(f"{flag} {shown} is not a finite number; give e.g. 3.5")


def check_frames(frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        low = max(1, (frames - 1) // 4 * 4 + 1)
        raise WanliteError(f"--frame_num {frames} must be 4k+1 (the VAE packs 4 frames per latent); "
                           f"nearest valid values: {low} or {low + 4}")


def check_clip_frames(frames: int) -> None:
    if frames < 4 or frames % 4:
        low = max(4, frames // 4 * 4)
        raise WanliteError(f"--infer_frames {frames} must be a multiple of 4 (frames per S2V clip); nearest valid "
                           f"values: {low} or {low + 4}")


def check_speech_flags(task: TaskSpec, req: Request, files: bool = True) -> None:
    speech = task.conditioning == "speech"
    if not speech:
        given = [f"--{flag}" for flag in ("audio", "pose_video", "num_clip") if getattr(req, flag) is not None]
        if req.start_from_ref:
            given.append("--start_from_ref")
        if given:
            raise WanliteError(f"{', '.join(given)}: only the speech-to-video task (s2v-14B) uses them")
        return
    if req.audio is None and files:
        raise WanliteError(f"{task.name} is driven by speech: pass --audio FILE (wav, mp3, m4a or a video with sound)")
    if req.num_clip is not None and req.num_clip < 1:
        raise WanliteError(f"--num_clip {req.num_clip} must be at least 1")


def check_animate_flags(task: TaskSpec, req: Request, files: bool = True) -> None:
    if task.conditioning != "animate":
        if req.src_root_path is not None or req.replace or req.relighting_lora:
            raise WanliteError("--src_root_path / --replace / --use_relighting_lora: only the character-animation "
                               "task (animate-14B) uses them")
        return
    if req.src_root_path is None and files:
        raise WanliteError(f"{task.name} animates a preprocessed folder: pass --src_root_path DIR (src_pose.mp4, "
                           "src_face.mp4, src_ref.png; with --replace also src_bg.mp4 and src_mask.mp4)")
    if req.refert_num not in (1, 5):
        raise WanliteError(f"--refert_num {req.refert_num} must be 1 or 5 (frames each segment overlaps the "
                           "previous one)")
    if req.ckpt_dir is None and files:
        raise WanliteError(f"{task.name} needs --ckpt_dir (its CLIP image encoder lives there)")
    if req.relighting_lora and (req.ckpt_dir is None or not (Path(req.ckpt_dir) / RELIGHTING_LORA).is_file()):
        raise WanliteError(f"--use_relighting_lora: {Path(req.ckpt_dir) / RELIGHTING_LORA} is missing; it ships with "
                           "Wan2.2-Animate-14B")


def check_component_flags(task: TaskSpec, req: Request, files: bool = True) -> None:
    given = req.component_files()
    if len(task.experts) > 1 and "dit" in given:
        raise WanliteError(f"--dit is for single-model tasks; {task.name} has two experts: pass "
                           "--high_noise_model FILE and --low_noise_model FILE")
    if len(task.experts) == 1 and {"high_noise_model", "low_noise_model"} & set(given):
        raise WanliteError(f"--high_noise_model / --low_noise_model are for the A14B tasks; {task.name} has one "
                           "transformer: pass --dit FILE")
    if files and req.ckpt_dir is None and not given:
        raise WanliteError("pass --ckpt_dir DIR (or the component files: --dit / --high_noise_model "
                           "--low_noise_model, --t5, --vae)")


MAX_RANKS = 64  # --ulysses_size: more GPUs than any one machine holds


def check_parallel(task: TaskSpec, req: Request) -> None:
    """The multi-GPU flags make sense together; the checks against the model (heads, tokens) are resolve's."""
    if not 1 <= req.ulysses_size <= MAX_RANKS:
        raise WanliteError(f"--ulysses_size {req.ulysses_size}: give the number of GPUs, 1 to {MAX_RANKS}")
    if (req.dit_fsdp or req.t5_fsdp) and req.ulysses_size == 1:
        flag = "--dit_fsdp" if req.dit_fsdp else "--t5_fsdp"
        raise WanliteError(f"{flag} shards weights over several GPUs: launch with torchrun --nproc_per_node N and "
                           "pass --ulysses_size N")
    if req.ulysses_size > 1 and task.conditioning not in ("text", "image_concat", "first_frame"):
        raise WanliteError(f"--ulysses_size splits T2V / I2V / TI2V generations; {task.name} runs on one GPU for "
                           "now: drop --ulysses_size")


def validate(req: Request, seed: int, files: bool = True) -> Settings:
    """Validate a request against its task and fill the official defaults; `files=False` plans a request
    without checkpoint files or inputs (`wanlite plan` before a download: `--size` is the video's size)."""
    task = task_spec(req.task)
    if task.image == "forbidden" and req.image is not None:
        raise WanliteError(f"--image is not used by {task.name} (text-to-video); use i2v-A14B or ti2v-5B")
    if task.image == "required" and req.image is None and files:  # planning before a download: --size stands in
        raise WanliteError(f"{task.name} animates an image: pass --image PATH")
    if req.image is not None:
        check_image(Path(req.image))
    check_component_flags(task, req, files)
    check_speech_flags(task, req, files)
    check_animate_flags(task, req, files)
    size = req.size or task.size
    frames = task.frames if req.frames is None else req.frames
    check_limits(req, size, frames)
    check_parallel(task, req)
    if task.conditioning == "speech":  # --size is the area to fit; the reference image sets the aspect
        if size[0] < 64 or size[1] < 64:
            raise WanliteError(f"--size {size[0]}*{size[1]}: S2V sizes are multiples of 64; give at least 64*64")
        check_clip_frames(frames)
    else:
        check_size(task, size)
        check_frames(frames)
    from wanlite.lora import MODES, PRESETS, parse_lora_arg

    for text in (*req.lora, *req.lora_high, *req.lora_low):
        parse_lora_arg(text)  # a bad strength fails before the files are looked at
    if req.lora_mode not in MODES:
        raise WanliteError(f"--lora_mode {req.lora_mode!r} is unknown; choose one of {', '.join(MODES)}")
    if req.preset is not None and req.preset not in PRESETS:
        raise WanliteError(f"--preset {req.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    recipe = PRESETS.get(req.preset, {})
    steps = recipe.get("steps", task.steps) if req.steps is None else req.steps
    if steps < 1:
        raise WanliteError(f"--sample_steps {steps} must be at least 1")
    if steps > MAX_STEPS:
        raise WanliteError(f"--sample_steps {steps}: at most {MAX_STEPS} (the official recipes use 40 or 50)")
    shift = recipe.get("shift", task.shift) if req.shift is None else req.shift
    if not shift > 0 or not math.isfinite(shift):
        raise WanliteError(f"--sample_shift {shift} must be a positive number")
    solver = req.solver or recipe.get("solver", task.solver)
    if solver not in SOLVERS:
        raise WanliteError(f"--sample_solver {solver!r} is unknown; choose one of {', '.join(SOLVERS)}")
    if req.vae_tile is not None and req.vae_tile != 0 and req.vae_tile < 4:
        raise WanliteError(f"--vae-tile {req.vae_tile}: give a tile of at least 4 latent pixels, or 0 for no tiling")
    if req.cfg not in ("auto", "batched", "per_block"):
        raise WanliteError(f"--cfg {req.cfg!r} is unknown; choose auto, batched or per_block")
    if req.vae_dtype not in ("fp32", "bf16"):
        raise WanliteError(f"--vae_dtype {req.vae_dtype!r} is unknown; choose fp32 or bf16")
    if req.offload not in ("auto", "none", "model", "block"):
        raise WanliteError(f"--offload {req.offload!r} is unknown; choose one of auto, none, model, block")
    if req.ram_mode not in (None, "pinned", "mmap", "disk"):
        raise WanliteError(f"--ram_mode {req.ram_mode!r} is unknown; choose one of pinned, mmap, disk")
    for flag in ("resident_blocks", "prefetch", "chunk_tokens"):
        if getattr(req, flag) is not None and getattr(req, flag) < 0:
            raise WanliteError(f"--{flag} {getattr(req, flag)} must be 0 or more")
    cache_settings(req)  # a bad cache setting fails before anything is loaded
    guide = req.guide_scale or recipe.get("guide_scale", task.guide_scale)
    check_finite("--sample_guide_scale", guide)
    negative = req.negative_prompt or task.negative_prompt  # official: an empty one means the default
    return Settings(task=task.name, prompt=req.prompt, negative_prompt=negative, seed=seed, steps=steps,
                    shift=shift, guide_scale=tuple(guide), solver=solver, size=tuple(size), frames=frames,
                    fps=task.fps, image=None if req.image is None else str(req.image),
                    boundary=recipe.get("boundary") if task.boundary is not None else None,
                    phases=tuple(recipe.get("phases", ())),
                    audio=None if req.audio is None else str(req.audio),
                    pose_video=None if req.pose_video is None else str(req.pose_video),
                    num_clip=req.num_clip, start_from_ref=req.start_from_ref,
                    src_root_path=None if req.src_root_path is None else str(req.src_root_path),
                    replace=req.replace, refert_num=req.refert_num, relighting_lora=req.relighting_lora,
                    preset=req.preset)


def cache_settings(req: Request, name=None):
    """The step-cache config of `--cache` (or `name`, a profile's choice), None: off; raises WanliteError for
    inconsistent settings."""
    from wanlite.cache import cache_config

    name = name if name is not None else ("off" if req.cache == "auto" else req.cache)
    return cache_config(name, req.cache_threshold, req.cache_fn, req.cache_bn, req.taylorseer_order)
