"""WanDiT: the one diffusion transformer for t2v / i2v / ti2v / s2v (official `wan/modules/model.py:WanModel`,
`wan/modules/s2v/model_s2v.py:WanModel_S2V`: the same blocks plus the parts in wanlite.models.s2v).

The block loop is a single seam, `self.runner(blocks, x, inputs)`: a plain loop by default; offload and step
caching replace the runner instead of patching blocks.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wanlite.models.animate import (AnimateConditions, FaceAdapter, FaceMotionEncoder, FaceTokenEncoder, FaceTokens,
                                    ImageProjection)
from wanlite.models.blocks import BlockInputs, Head, WanBlock, linear_fp32
from wanlite.models.rope import rope_cos_sin, rope_cos_sin_at
from wanlite.models.s2v import (REF_TIME_POSITION, AudioInjector, AudioTokens, CausalAudioEncoder, FramePacker,
                                S2VConditions, grid_positions)
from wanlite.specs import DiTSpec

# runner(blocks, x, inputs, start=0, stop=None) -> x after blocks[start:stop]; the model always asks for all
# of them, a step cache wrapping another runner asks for ranges
Runner = Callable[..., torch.Tensor]


FACE_BATCH = 8  # face crops through the motion network at a time (its 512x512 activations are large)


def face_adapter_layers(spec: DiTSpec) -> list[int]:
    """The blocks a face adapter follows: 0, 5, 10, ... (num_layers // 5 of them, official `FaceAdapter`)."""
    every = spec.animate.face_every
    return [every * k for k in range(spec.num_layers // every)]


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, inputs: BlockInputs, start: int = 0,
               stop: int | None = None) -> torch.Tensor:
    """The default runner: the blocks in order, on whatever device they live."""
    for block in blocks[start:stop]:
        x = block(x, inputs)
    return x


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos | sin] of t * 10000^(-i/half), computed in float64 (official `sinusoidal_embedding_1d`)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class WanDiT(nn.Module):
    def __init__(self, spec: DiTSpec):
        super().__init__()
        self.spec = spec
        d = spec.dim
        self.patch_embedding = nn.Conv3d(spec.in_dim, d, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(spec.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(spec.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(d, spec.ffn_dim, spec.num_heads, spec.eps, spec.animate is not None)
                                    for _ in range(spec.num_layers))
        self.head = Head(d, spec.out_dim * math.prod(spec.patch_size), spec.eps)
        if spec.s2v is not None:
            self.cond_encoder = nn.Conv3d(spec.s2v.cond_dim, d, kernel_size=spec.patch_size, stride=spec.patch_size)
            self.casual_audio_encoder = CausalAudioEncoder(spec.s2v, d)  # sic: the official key prefix
            self.trainable_cond_mask = nn.Embedding(3, d)  # added to noisy / reference / motion tokens
            self.frame_packer = FramePacker(spec.s2v, d)
            for layer in spec.s2v.inject_layers:
                self.blocks[layer].audio_injector = AudioInjector(d, spec.num_heads, spec.eps)
        if spec.animate is not None:
            a = spec.animate
            self.pose_patch_embedding = nn.Conv3d(16, d, kernel_size=spec.patch_size, stride=spec.patch_size)
            self.img_emb = ImageProjection(a.clip_dim, d)
            self.motion_encoder = FaceMotionEncoder(a)
            self.face_encoder = FaceTokenEncoder(a, d)
            for layer in face_adapter_layers(spec):
                self.blocks[layer].face_adapter = FaceAdapter(d, spec.num_heads)
        self.runner: Runner = run_blocks
        self.chunk_tokens: int | None = None  # blocks work this many tokens at a time (the plan sets it)
        self.rows_apart = False  # per-block CFG: cond and uncond through each block one after the other (the plan)
        # several GPUs: a wanlite.parallel.SequenceParallel; the blocks then run on this rank's slice of the tokens
        self.sequence_parallel = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B, Fe] -> e [B, Fe, d] and e0 [B, Fe, 6, d], both fp32 (the reference's fp32 island)."""
        b, fe = t.shape
        sin = sinusoidal_embedding(self.spec.freq_dim, t.flatten())
        e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], sin)))
        e0 = linear_fp32(self.time_projection[1], F.silu(e))
        return e.view(b, fe, -1), e0.view(b, fe, 6, -1)

    def embed_text(self, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Zero-pad every prompt to text_len rows (no mask, as the reference), then embed: [B, text_len, d]."""
        text_len = self.spec.text_len
        rows = list(context) if isinstance(context, (list, tuple)) else list(context.unbind(0))
        for r in rows:
            if r.ndim != 2 or r.shape[-1] != self.spec.text_dim or r.shape[0] > text_len:
                raise ValueError(f"each context must be [<= {text_len}, {self.spec.text_dim}], got {tuple(r.shape)}")
        padded = torch.stack([F.pad(r, (0, 0, 0, text_len - r.shape[0])) for r in rows])
        return self.text_embedding(padded.to(self.compute_dtype))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | list[torch.Tensor],
        y: torch.Tensor | None = None,
        s2v: S2VConditions | None = None,
        animate: AnimateConditions | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: latents [B, C, F, H, W]; t: timesteps [B] (all tokens) or [B, F] (one per latent frame, TI2V);
        context: [B, <=text_len, text_dim] or a list of [L_i, text_dim]; y: i2v conditioning [B, C', F, H, W]
        concatenated on channels; s2v: the S2V model's reference / motion / pose / audio inputs; animate: the
        Animate model's CLIP features, pose latents and face crops.
        Returns float32 [B, out_dim, F, H, W].
        """
        if (s2v is None) != (self.spec.s2v is None) or (animate is None) != (self.spec.animate is None):
            raise ValueError("the S2V and Animate DiTs need their own conditions; other DiTs take none")
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        b, c, f, h, w = x.shape
        pt, ph, pw = self.spec.patch_size
        if c != self.spec.in_dim:
            raise ValueError(f"the {self.spec.model_type} DiT takes {self.spec.in_dim} input channels, got {c}")
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size {(f, h, w)} is not divisible by the patch size {self.spec.patch_size}")
        t = t.reshape(b, -1) if t.ndim == 1 else t
        if t.shape[1] not in (1, f // pt):
            raise ValueError(f"t must be [B] or [B, {f // pt}] (one per latent frame), got {tuple(t.shape)}")
        grid = (f // pt, h // ph, w // pw)

        e, e0 = self.embed_time(t)
        rope = rope_cos_sin(grid, self.spec.head_dim, device=x.device)
        sp, part = self.sequence_parallel, None
        if sp is not None:
            if s2v is not None or animate is not None:
                raise ValueError("sequence parallelism runs the T2V / I2V / TI2V DiTs only")
            part = sp.slice(math.prod(grid), e.shape[1])  # this rank's tokens and the modulation rows they use
            e, e0 = e[:, part.rows], e0[:, part.rows]
            rope = (rope[0][part.start:part.stop], rope[1][part.start:part.stop])
        inputs = BlockInputs(e0=e0, context=self.embed_text(context), rope=rope, chunk=self.chunk_tokens,
                             split=None if part is None else part.split, rows_apart=self.rows_apart,
                             overwrite=self.rows_apart, parallel=sp)
        if animate is not None:
            tokens = self.runner(self.blocks, self._animate_sequence(x, animate, inputs), inputs)
            return self.unpatchify(self.head(tokens, e, self.chunk_tokens), grid)
        if s2v is None:
            # the embedded tokens [B, L, d] go straight into the runner, so no name here keeps them alive while
            # the blocks run (the runner drops each block's input as the next one starts)
            tokens = self.runner(self.blocks, self._patches(x, part), inputs)
            out = self.head(tokens, e, self.chunk_tokens, inputs.split)
            return self.unpatchify(out if sp is None else sp.gather(out), grid)
        noisy = math.prod(grid)
        tokens = self.runner(self.blocks, self._s2v_sequence(x, t, s2v, inputs), inputs)
        return self.unpatchify(self.head(tokens[:, :noisy], e, self.chunk_tokens), grid)

    def _patches(self, x: torch.Tensor, part=None) -> torch.Tensor:
        """The embedded patches [B, L, d] (a rank's `part` of them), contiguous: per-block CFG writes every
        block's output over them."""
        tokens = self.patch_embedding(x.to(self.compute_dtype)).flatten(2).transpose(1, 2)
        return (tokens if part is None else tokens[:, part.start:part.stop]).contiguous()

    def _animate_sequence(self, x: torch.Tensor, animate: AnimateConditions, inputs: BlockInputs) -> torch.Tensor:
        """Animate's tokens: patches with the pose embedding added to every latent frame after the reference
        one; fills in `inputs` with the CLIP image tokens and the face tokens (a zero group for the reference
        frame, then the face crops' motion, 4 crops per latent frame)."""
        dtype = self.compute_dtype
        tokens = self.patch_embedding(x.to(dtype))
        tokens[:, :, 1:] += self.pose_patch_embedding(animate.pose_latents.to(dtype))
        inputs.image_context = self.img_emb(animate.clip_features.to(dtype))
        b, _, frames = animate.face_pixels.shape[:3]
        faces = animate.face_pixels.transpose(1, 2).flatten(0, 1).to(dtype)  # [(B T), 3, S, S]
        motion = torch.cat([self.motion_encoder(faces[i:i + FACE_BATCH]) for i in range(0, len(faces), FACE_BATCH)])
        face = self.face_encoder(motion.view(b, frames, -1))
        inputs.face = FaceTokens(torch.cat([torch.zeros_like(face[:, :1]), face], dim=1))
        if inputs.face.tokens.shape[1] != tokens.shape[2]:
            raise ValueError(f"{frames} face crops give {inputs.face.tokens.shape[1] - 1} latent frames after the "
                             f"reference, the clip has {tokens.shape[2] - 1}")
        return tokens.flatten(2).transpose(1, 2).contiguous()

    def _s2v_sequence(self, x: torch.Tensor, t: torch.Tensor, s2v: S2VConditions, inputs: BlockInputs):
        """The S2V token sequence [noisy + pose | reference | motion history], each segment tagged by its
        `trainable_cond_mask` row; fills in `inputs`: RoPE of all tokens, the zero-timestep modulation row
        for the reference and motion tokens (`split`), and the audio tokens for the injectors."""
        spec, dtype = self.spec.s2v, self.compute_dtype
        b, _, f, h, w = x.shape
        tokens = self.patch_embedding(x.to(dtype))
        if s2v.pose_latents is None:  # the reference feeds zero latents: only the bias is left
            tokens = tokens + self.cond_encoder.bias.to(dtype).view(1, -1, 1, 1, 1)
        else:
            tokens = tokens + self.cond_encoder(s2v.pose_latents.to(dtype))
        hp, wp = tokens.shape[-2:]
        parts = [tokens.flatten(2).transpose(1, 2),
                 self.patch_embedding(s2v.ref_latents.to(dtype)).flatten(2).transpose(1, 2)]
        positions = [grid_positions(1, hp, wp, t0=REF_TIME_POSITION)]
        if s2v.motion_latents is not None:
            motion, motion_positions = self.frame_packer(s2v.motion_latents)
            parts.append(motion)
            positions.append(motion_positions)
        mask = self.trainable_cond_mask.weight
        seq = torch.cat([p + mask[i].to(dtype) for i, p in enumerate(parts)], dim=1)
        noisy = parts[0].shape[1]
        del parts, tokens

        cos, sin = rope_cos_sin_at(torch.cat(positions).to(x.device), self.spec.head_dim)
        inputs.rope = (torch.cat([inputs.rope[0], cos]), torch.cat([inputs.rope[1], sin]))
        _, e0_still = self.embed_time(torch.zeros_like(t.reshape(b, -1)[:, :1]))
        inputs.e0 = torch.cat([inputs.e0, e0_still], dim=1)
        inputs.split = (noisy, seq.shape[1] - noisy)
        # the audio left-padded with its first frame over the motion history's span, whose tokens are dropped
        audio = s2v.audio.float()
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], spec.motion_frames), audio], dim=-1)
        local, global_ = self.casual_audio_encoder(audio)
        skip = spec.motion_latents
        if local.shape[1] - skip != f:
            raise ValueError(f"{audio.shape[-1] - spec.motion_frames} audio frames give {local.shape[1] - skip} "
                             f"latent frames, the clip has {f}")
        inputs.audio = AudioTokens(local[:, skip:], global_[:, skip:, 0], noisy)
        return seq

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, prod(patch)*C] with C fastest -> [B, C, F, H, W] (official einsum 'fhwpqrc->cfphqwr')."""
        pt, ph, pw = self.spec.patch_size
        f, h, w = grid
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, self.spec.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(out.shape[0], self.spec.out_dim, f * pt, h * ph, w * pw).float()
