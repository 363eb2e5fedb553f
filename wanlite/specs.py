"""Model specs as frozen data: every Wan2.2 network is built from one of these (official `wan/configs/*`)."""
from __future__ import annotations

from dataclasses import dataclass, replace

WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

# in/out channels identify the DiT variant (model_type) of a checkpoint, whatever its size.
MODEL_TYPE_CHANNELS = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}


@dataclass(frozen=True)
class S2VSpec:
    """The speech-to-video additions to a DiT (`WanModel_S2V`, released config.json): a causal audio encoder
    over weighted wav2vec2 layers, audio cross-attention injected after some blocks, a pose encoder, FramePack
    motion history and per-token segment ids."""

    audio_dim: int = 1024  # wav2vec2 hidden size
    audio_layers: int = 25  # wav2vec2 hidden states (embeddings + 24 layers)
    audio_tokens: int = 4  # local audio tokens per latent frame (+ 1 learned padding token)
    inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    cond_dim: int = 16  # pose latent channels
    motion_frames: int = 73  # pixel frames of motion history (19 latents)
    pack_buckets: tuple[int, int, int] = (1, 2, 16)  # newest latents at 1x, 2x, 4x compression

    @property
    def motion_latents(self) -> int:
        return (self.motion_frames + 3) // 4


@dataclass(frozen=True)
class AnimateSpec:
    """The character-animation additions (`WanAnimateModel`): CLIP image tokens in every cross-attention, a
    pose embedding, a face-motion network over face crops and face adapters after every `face_every`-th block."""

    face_size: int = 512  # face crop side the motion network takes
    face_width: int = 512  # its widest feature maps (the official channel table is capped here; tiny: less)
    motion_dim: int = 512  # its appearance / motion vector width (motion_encoder_dim)
    motion_codes: int = 20  # orthogonal motion directions
    face_tokens: int = 4  # face token streams per latent frame (+ 1 learned padding token)
    face_hidden: int = 1024  # the face token encoder's width
    face_every: int = 5  # a face adapter after blocks 0, 5, 10, ...
    clip_dim: int = 1280  # CLIP ViT-H/14 width
    image_tokens: int = 257  # CLS + 16 x 16 patches


@dataclass(frozen=True)
class DiTSpec:
    """Hyper-parameters of one Wan DiT (`WanModel.__init__`); head_dim = dim / num_heads."""

    model_type: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    s2v: S2VSpec | None = None
    animate: AnimateSpec | None = None

    def __post_init__(self):
        if self.s2v is not None and max(self.s2v.inject_layers, default=0) >= self.num_layers:
            raise ValueError(f"audio injection after block {max(self.s2v.inject_layers)} but the DiT has "
                             f"{self.num_layers} blocks")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAESpec:
    """Wan VAE hyper-parameters: version "2.1" (z16, 4x8x8) or "2.2" (z48, 2x2 patchify, residual stages)."""

    version: str
    dim: int
    dec_dim: int
    z_dim: int
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self):
        if self.version not in ("2.1", "2.2"):
            raise ValueError(f"VAE version must be '2.1' or '2.2', got {self.version!r}")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent mean/std need {self.z_dim} values")

    @property
    def patch_size(self) -> int:
        return 2 if self.version == "2.2" else 1

    @property
    def stride(self) -> tuple[int, int, int]:
        spatial = 2 ** (len(self.dim_mult) - 1) * self.patch_size
        return (2 ** sum(self.temporal_downsample), spatial, spatial)


@dataclass(frozen=True)
class T5Spec:
    """umT5 encoder hyper-parameters (transformers `UMT5Config` fields)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128


DIT_SPECS = {
    "t2v-A14B": DiTSpec("t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16),
    "i2v-A14B": DiTSpec("i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16),
    "ti2v-5B": DiTSpec("ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    "s2v-14B": DiTSpec("s2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16,
                       s2v=S2VSpec()),
    "animate-14B": DiTSpec("animate", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16,
                           animate=AnimateSpec()),
}

VAE_SPECS = {
    "vae2.1": VAESpec("2.1", dim=96, dec_dim=96, z_dim=16),
    "vae2.2": VAESpec("2.2", dim=160, dec_dim=256, z_dim=48,
                      latent_mean=WAN22_LATENT_MEAN, latent_std=WAN22_LATENT_STD),
}

T5_SPECS = {"umt5-xxl-encoder": T5Spec()}

# Tiny variants for tests and fixtures. They keep head_dim 128 (so the real 44/42/42 RoPE split runs and a
# config-less ComfyUI file still tells its head count), the real channel counts and the real VAE structure.
TINY_T5 = T5Spec(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
TINY_DIT_SPECS = {
    name: replace(spec, dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=TINY_T5.d_model,
                  s2v=spec.s2v and replace(spec.s2v, audio_dim=32, audio_layers=3, inject_layers=(0, 1)),
                  animate=spec.animate and replace(spec.animate, face_every=1, face_size=32, face_width=16,
                                                   motion_dim=32, motion_codes=4, face_hidden=32, clip_dim=64))
    for name, spec in DIT_SPECS.items()
}
TINY_VAE_SPECS = {
    "vae2.1": replace(VAE_SPECS["vae2.1"], dim=8, dec_dim=8),
    "vae2.2": replace(VAE_SPECS["vae2.2"], dim=8, dec_dim=8),
}

# The official negative prompt (`wan_shared_cfg.sample_neg_prompt`), used whenever none is given.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)


# S2V-14B's own negative prompt (`wan_s2v_14B.sample_neg_prompt`)
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything that makes one Wan task different from another; the generation loop reads only this."""

    name: str
    dit: str  # key of DIT_SPECS
    vae: str  # key of VAE_SPECS
    experts: tuple[str, ...]  # ("high_noise", "low_noise") for MoE, ("main",) otherwise
    # "text", "image_concat" (I2V-A14B channels), "first_frame" (TI2V latent frame 0), "speech" (S2V: a
    # reference image and audio, generated clip by clip; `frames` is then the frames per clip) or "animate"
    # (a preprocessed pose / face / reference folder, generated segment by segment; `frames` per segment)
    conditioning: str
    image: str  # "forbidden" | "required" | "optional"
    steps: int
    shift: float
    guide_scale: tuple[float, float]  # (low noise, high noise), the official tuple order
    frames: int
    fps: int
    size: tuple[int, int]  # default (width, height)
    sizes: tuple[tuple[int, int], ...]  # official presets
    boundary: float | None = None  # switch to the low-noise expert once t < boundary * 1000
    solver: str = "unipc"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT

    @property
    def stride(self) -> int:
        """Pixel multiple that width and height must respect: VAE stride x DiT patch."""
        return VAE_SPECS[self.vae].stride[1] * DIT_SPECS[self.dit].patch_size[1]


_A14B_SIZES = ((1280, 720), (720, 1280), (832, 480), (480, 832))
TASKS = {
    "t2v-A14B": TaskSpec("t2v-A14B", "t2v-A14B", "vae2.1", ("high_noise", "low_noise"), "text", "forbidden",
                         steps=40, shift=12.0, guide_scale=(3.0, 4.0), frames=81, fps=16, size=(1280, 720),
                         sizes=_A14B_SIZES, boundary=0.875),
    "i2v-A14B": TaskSpec("i2v-A14B", "i2v-A14B", "vae2.1", ("high_noise", "low_noise"), "image_concat", "required",
                         steps=40, shift=5.0, guide_scale=(3.5, 3.5), frames=81, fps=16, size=(1280, 720),
                         sizes=_A14B_SIZES, boundary=0.900),
    "ti2v-5B": TaskSpec("ti2v-5B", "ti2v-5B", "vae2.2", ("main",), "first_frame", "optional",
                        steps=50, shift=5.0, guide_scale=(5.0, 5.0), frames=121, fps=24, size=(1280, 704),
                        sizes=((1280, 704), (704, 1280))),
}

TASKS["s2v-14B"] = TaskSpec("s2v-14B", "s2v-14B", "vae2.1", ("main",), "speech", "required", steps=40, shift=3.0,
                            guide_scale=(4.5, 4.5), frames=80, fps=16, size=(1024, 704),
                            sizes=(*_A14B_SIZES, (1024, 704), (704, 1024), (1280, 704), (704, 1280)),
                            negative_prompt=S2V_NEGATIVE_PROMPT)

TASKS["animate-14B"] = TaskSpec("animate-14B", "animate-14B", "vae2.1", ("main",), "animate", "forbidden", steps=20,
                                shift=5.0, guide_scale=(1.0, 1.0), frames=77, fps=30, size=(1280, 720),
                                sizes=((1280, 720), (720, 1280)))

# The bundled tiny models (wanlite.tiny): real architectures at toy sizes, trained here on coloured shapes.
TASKS["tiny-t2v"] = TaskSpec("tiny-t2v", "t2v-A14B", "vae2.1", ("high_noise", "low_noise"), "text", "forbidden",
                             steps=20, shift=5.0, guide_scale=(4.0, 4.0), frames=17, fps=8, size=(64, 64),
                             sizes=((64, 64),), boundary=0.875, negative_prompt="")
TASKS["tiny-ti2v"] = TaskSpec("tiny-ti2v", "ti2v-5B", "vae2.2", ("main",), "first_frame", "optional",
                              steps=20, shift=5.0, guide_scale=(4.0, 4.0), frames=17, fps=8, size=(128, 128),
                              sizes=((128, 128),), negative_prompt="")
