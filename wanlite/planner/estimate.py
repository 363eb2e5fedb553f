"""What each part of a generation needs: weight bytes per format (from the full-size models built on `meta`),
activation peaks (formulas below, validated against traced allocations in tests/test_planner.py), FLOPs and
bytes moved per step.

DiT forward, per CFG batch B (= 2), L video tokens, T = 512 text rows, hidden d, bf16 compute; the numbers
are exact fits to allocations traced with `LiveBytes` on CPU (d = 256...1024, L = 2048...8192, any ffn/d):
- a block run whole peaks at 24 x B*L*d bytes (its fp32 islands — LayerNorm, modulation, gated residual,
  RMSNorm of q/k — keep several fp32 copies of the hidden state alive next to q and the attention output);
- a block run in chunks of n tokens (`WanDiT.chunk_tokens`) peaks at 6 x B*L*d (keys, values, output) plus
  20 x B*n*d for the chunk's temporaries;
- besides the block: its input (2 x B*L*d), the embedded text (2 x B*T*d), RoPE tables (4 x L*head_dim) and
  the fp32 modulation;
- a weight-only quantized Linear dequantizes its weight before the GEMM: + the largest weight (d*ffn*2).
VAE decode (causal, one latent frame -> 4 video frames at a time): the fp32 activations of a frame chunk,
VAE_BYTES_PER_PIXEL[version] per pixel of the frame (traced on CPU with the full-size VAEs: 19.6 KB for 2.1,
20.7 KB for 2.2, linear in pixels); frames stream to the writer as they are decoded; a spatial tile
bounds the pixels to tile x tile, but the middle block still sees the whole latent frame: its attention
(2 n^2 fp32 for n latent pixels) plus VAE_MIDDLE_BYTES_PER_LATENT_PIXEL per latent pixel, whichever is larger
(Wan2.1 at 720p: the middle block, 1.9 GB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from wanlite.specs import DIT_SPECS, TASKS, VAE_SPECS, DiTSpec

GB = 1e9
WHOLE_BLOCK = 24.0  # bf16 block peak / (B * L * d), run whole
CHUNKED_BLOCK = 6.0  # ... run in chunks, plus CHUNK_TEMPS * B * n * d
CHUNK_TEMPS = 20.0
VAE_BYTES_PER_PIXEL = {"2.1": 19650.0, "2.2": 20700.0}  # decode peak / pixels of one frame (traced, fp32)
# a tiled decode runs the middle block on whole latent frames: its self-attention scores and softmax (2 n^2 fp32
# for n latent pixels) plus feature maps per latent pixel (traced on meta: exact for every size tried)
VAE_MIDDLE_BYTES_PER_LATENT_PIXEL = {"2.1": 18688.0, "2.2": 49920.0}
TEXT_LEN = 512
CFG_BATCH = 2
# VAE decode FLOPs per output pixel of one frame (FlopCounterMode over the full-size decoders on the meta
# device, the difference between 9 and 5 frames at 64x64 px; the middle block's attention adds ~1 % at 720p)
VAE_DECODE_FLOPS_PER_PIXEL = {"2.1": 8.45e6, "2.2": 18.4e6}


@dataclass(frozen=True)
class ExtenderSpec:
    """The local prompt extender's size (a Qwen / Qwen-VL chat model, `wanlite.pipelines.prompt_extend`): its
    parameters counted on the model built on meta from its config, and what its generation keeps per token."""

    name: str
    params: int  # every parameter (stored bf16)
    linear_params: int  # weights of the decoder layers' Linears: what --quant int8 / Q4_K shrinks
    layers: int
    kv_dim: int  # key/value heads x head dim: the KV cache per token and layer is 2 x kv_dim values
    intermediate: int  # the MLP's width (prefill temporaries)
    vocab: int
    vision: bool = False  # a vision tower reads the image (Qwen-VL)


@dataclass(frozen=True)
class Workload:
    task: str
    width: int
    height: int
    frames: int
    steps: int
    dit: DiTSpec | None = None  # the checkpoint's transformer when known; else the task's full-size one
    cache: object = None  # the step cache's config (wanlite.cache), None: off
    passes: int = CFG_BATCH  # forwards batched per step: 2 with CFG, 1 at guide 1 (distilled LoRAs)
    lora_rank: int = 0  # total rank of the LoRAs kept as runtime branches (merged ones cost nothing)
    fp8_lora_rank: int = 0  # ... that become branches only if the plan picks fp8 (merging would round them away)
    extender: ExtenderSpec | None = None  # the local prompt extender (--use_prompt_extend local_qwen), None: none
    ranks: int = 1  # GPUs the tokens are split over (--ulysses_size); every figure of the plan is per GPU
    fsdp: bool = False  # the transformer's weights sharded over them (--dit_fsdp)

    @property
    def spec(self) -> DiTSpec:
        return self.dit if self.dit is not None else DIT_SPECS[TASKS[self.task].dit]

    @property
    def latent(self) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width)."""
        vae = VAE_SPECS[TASKS[self.task].vae]
        vt, vs, _ = vae.stride
        return (self.frames - 1) // vt + 1, self.height // vs, self.width // vs

    @property
    def tokens(self) -> int:
        """Tokens of one DiT forward; S2V adds its reference frame and ~1.5 frames of FramePack history, Animate
        its reference frame."""
        f, h, w = self.latent
        pt, ph, pw = self.spec.patch_size
        per_frame = (h // ph) * (w // pw)
        extra = 0
        if self.spec.s2v is not None:  # reference + newest history latent, then the 2x and 4x packed groups
            extra = 2 * per_frame + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
        if self.spec.animate is not None:  # the reference image's latent frame before the segment's
            extra = per_frame
        return (f // pt) * per_frame + extra

    @property
    def rank_tokens(self) -> int:
        """Tokens of one GPU's share of a forward (all of them on one GPU)."""
        return self.tokens // self.ranks


@lru_cache(maxsize=None)
def dit_bytes(spec: DiTSpec, fmt: str) -> tuple[int, int]:
    """(non-block bytes, bytes of one block) of one expert stored in `fmt` (the planner's weight numbers:
    the model built on meta, every quantizable weight in `fmt`, the rest bf16). S2V's blocks differ (12 carry
    an audio injector): the block figure is their mean, so totals are exact; a ring buffer holding the
    largest is ~0.2 GB more than the mean, inside the planner's margin."""
    import torch

    from wanlite.models.dit import WanDiT
    from wanlite.quant import weight_bytes

    with torch.device("meta"):
        full = {k: tuple(v.shape) for k, v in WanDiT(spec).state_dict().items()}
    blocks = {k: v for k, v in full.items() if k.startswith("blocks.")}
    rest = {k: v for k, v in full.items() if not k.startswith("blocks.")}
    return weight_bytes(rest, "bf16"), weight_bytes(blocks, fmt) // spec.num_layers


@lru_cache(maxsize=None)
def t5_bytes(fmt: str) -> int:
    from wanlite.archs import manifest
    from wanlite.quant import weight_bytes

    return weight_bytes(manifest("umt5-xxl-encoder"), fmt if fmt in ("bf16", "fp8", "int8") else "bf16")


@lru_cache(maxsize=None)
def vae_bytes(version: str) -> int:
    from wanlite.archs import manifest

    return sum(4 * math.prod(s) for s in manifest("vae" + version).values())  # fp32, as the reference runs it


def dit_activation_bytes(spec: DiTSpec, tokens: int, chunk: int | None = None, quantized: bool = False,
                         batch: int = CFG_BATCH, rows_apart: bool = False, keeps_inputs: bool = False) -> int:
    """Peak activation bytes of one bf16 DiT forward of `batch` rows (CFG: 2; module docstring). `rows_apart`
    (per-block CFG): the rows go through each block one at a time, so the block's temporaries are one row's and
    each row's output is written over its input; when a step cache keeps block inputs (`keeps_inputs`) the
    rows fill a separate output (B*L*d more held)."""
    b, d = batch, spec.dim
    rows = 1 if rows_apart else b
    overwrite = rows_apart and b > 1 and not keeps_inputs
    if chunk is None or chunk >= tokens:
        block = WHOLE_BLOCK * rows * tokens * d
    else:  # a chunked row written over its input allocates no output of its own
        block = (CHUNKED_BLOCK - 2 * overwrite) * rows * tokens * d + CHUNK_TEMPS * rows * chunk * d
    held = 2 * b * tokens * d + 2 * b * TEXT_LEN * d + 4 * tokens * spec.head_dim + 4 * b * 6 * d
    if rows_apart and b > 1 and keeps_inputs:
        held += 2 * b * tokens * d
    dequant = 2 * spec.dim * spec.ffn_dim if quantized else 0
    return int(block + held + dequant)


ULYSSES_EXCHANGE = 6.0  # sequence parallel: q, k, v sent and received around the attention / (B * l * d), bf16


def exchange_bytes(spec: DiTSpec, tokens: int, batch: int = CFG_BATCH) -> int:
    """What one block's all-to-alls move out of each GPU, per forward: q, k, v and the attention output of its
    `tokens`, bf16 (the (N-1)/N that leaves the card is left out: an upper bound)."""
    return 4 * 2 * batch * tokens * spec.dim


def cache_state_bytes(spec: DiTSpec, tokens: int, config, batch: int = CFG_BATCH) -> int:
    """What a step cache keeps on the device between steps: bf16 [tokens, dim] tensors per CFG branch."""
    from wanlite.cache.config import state_tensors

    return batch * tokens * spec.dim * 2 * state_tensors(config)


def lora_block_bytes(spec: DiTSpec, rank: int) -> int:
    """Runtime LoRA branches of one block: bf16 down [r, in] and up [out, r] for its ten Linears."""
    d, f = spec.dim, spec.ffn_dim
    return 2 * rank * (8 * (d + d) + (d + f) + (f + d))


def t5_activation_bytes(dtype_bytes: int = 2) -> int:
    """umT5-xxl on two prompts padded to 512 tokens. The peak is inside one layer's attention: the layer's
    relative position bias [1, heads, T, T], that bias plus the padding mask broadcast to the batch
    [B, heads, T, T], and three hidden states [B, T, d_model]; layers do not accumulate (traced on CPU with
    transformers' UMT5 in tests/test_planner.py)."""
    d_model, heads = 4096, 64
    return int((1 + CFG_BATCH) * heads * TEXT_LEN**2 * dtype_bytes + 3 * CFG_BATCH * TEXT_LEN * d_model * dtype_bytes)


def vae_decode_bytes(task: str, height: int, width: int, frames: int, tile_px: int | None) -> int:
    """Peak device bytes of the VAE decode; tile_px = tile side in output pixels (None: whole frame). The
    decoded frames go to the mp4 writer chunk by chunk, so the video itself is never held (`frames` only
    matters to callers that keep it)."""
    spec = VAE_SPECS[TASKS[task].vae]
    if tile_px is None:
        return int(VAE_BYTES_PER_PIXEL[spec.version] * height * width)
    tile = VAE_BYTES_PER_PIXEL[spec.version] * min(height, tile_px) * min(width, tile_px)
    n = (height // spec.stride[1]) * (width // spec.stride[2])
    middle = 2 * n * n * 4 + VAE_MIDDLE_BYTES_PER_LATENT_PIXEL[spec.version] * n
    return int(max(tile, middle))


def vae_decode_flops(task: str, height: int, width: int, frames: int) -> float:
    return VAE_DECODE_FLOPS_PER_PIXEL[VAE_SPECS[TASKS[task].vae].version] * height * width * frames


def dit_flops(spec: DiTSpec, tokens: int, batch: int = CFG_BATCH) -> float:
    """FLOPs of one forward of `batch` rows (CFG: 2): the matmuls (2 per weight per token) plus attention."""
    b, d, f = batch, spec.dim, spec.ffn_dim
    per_token = 2 * (4 * d * d + 2 * d * d + 2 * d * f) + 2 * 2 * d * TEXT_LEN
    attention = 4 * tokens * d  # QK^T and PV, per query token
    return spec.num_layers * b * tokens * (per_token + attention) + 2 * b * TEXT_LEN * d * d * 2 * spec.num_layers


# The prompt extender runs alone, first (before the text encoder), and is released before anything else loads.
EXTENDER_TOKENS = 4096  # system prompt, user prompt, image tokens and the new tokens of one rewrite, at most
EXTENDER_VISION_BYTES = int(1.0 * GB)  # the vision tower over an image of at most 1 Mpx (allowance, not traced)
EXTENDER_WORKSPACE = int(0.3 * GB)  # kernels' workspaces and allocator rounding (allowance)
EXTENDER_FORMATS = {"none": "bf16", "int8": "int8", "gguf-q4_k": "Q4_K"}  # --quant name -> weight format


def extender_bytes(spec: ExtenderSpec, quant: str = "none") -> int:
    """Weight bytes of the extender with its decoder layers' Linears in `quant` (a key of EXTENDER_FORMATS) and
    the rest (embeddings, head, norms, vision tower) in bf16."""
    from wanlite.quant import FORMATS

    fmt = FORMATS[EXTENDER_FORMATS[quant]]
    rest = spec.params - spec.linear_params
    scales = 0 if not fmt.row_scale_bytes else fmt.row_scale_bytes * spec.linear_params // max(spec.intermediate, 1)
    return int(2 * rest + spec.linear_params * fmt.bits_per_weight / 8 + scales)


def extender_activation_bytes(spec: ExtenderSpec, dtype_bytes: int = 2) -> int:
    """An allowance for one greedy rewrite of EXTENDER_TOKENS tokens: the KV cache (2 x layers x kv_dim per
    token), the prefill's MLP temporaries (3 x tokens x intermediate), fp32 logits of the last position, the
    vision tower's activations for VL models, and a fixed workspace."""
    kv = 2 * spec.layers * spec.kv_dim * EXTENDER_TOKENS * dtype_bytes
    mlp = 3 * EXTENDER_TOKENS * spec.intermediate * dtype_bytes
    logits = 2 * spec.vocab * 4
    return int(kv + mlp + logits + (EXTENDER_VISION_BYTES if spec.vision else 0) + EXTENDER_WORKSPACE)
