"""Speech features for S2V: any file's audio track -> 16 kHz mono (bundled ffmpeg) -> wav2vec2 hidden states ->
one feature column per 16-fps video frame (official `wan/modules/s2v/audio_encoder.py`).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanlite.errors import WanliteError

SAMPLE_RATE = 16000
WAV2VEC_RATE = 50  # wav2vec2 frames per second (320-sample stride)
FEATURE_RATE = 30  # the reference resamples the features to 30 fps before picking video frames


def read_audio(path: Path) -> np.ndarray:
    """The first audio stream of any file ffmpeg reads (wav, mp3, m4a, a video...), as float32 16 kHz mono."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise WanliteError(f"--audio {path}: no such file")
    run = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), "-map", "0:a:0",
                          "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"], capture_output=True)
    err = run.stderr.decode(errors="replace").strip()
    if run.returncode != 0:
        if "matches no streams" in err:
            raise WanliteError(f"--audio {path}: the file has no audio stream; give a speech or song file")
        last = err.splitlines()[-1] if err else f"ffmpeg exit {run.returncode}"
        raise WanliteError(f"--audio {path}: ffmpeg cannot read it ({last}); give a wav, mp3, m4a or video file")
    wave = np.frombuffer(run.stdout, dtype=np.float32)
    if wave.size == 0:
        raise WanliteError(f"--audio {path}: the audio stream is empty")
    return wave


class SpeechEncoder:
    """wav2vec2 from the checkpoint's `wav2vec2-large-xlsr-53-english` folder (a transformers Wav2Vec2ForCTC
    folder; only its encoder runs), every hidden state kept."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

        from wanlite.hf_folders import refuse_remote_code

        refuse_remote_code(folder, "wav2vec2 model")
        local = {"local_files_only": True, "trust_remote_code": False}
        self.extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), **local)
        self.model = Wav2Vec2ForCTC.from_pretrained(str(folder), dtype=dtype, **local).wav2vec2.to(device).eval()

    @torch.no_grad()
    def hidden_states(self, wave: np.ndarray) -> torch.Tensor:
        """[layers + 1, T_50, C] float32: the embedding output and every layer's output at 50 Hz."""
        values = self.extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        model = self.model
        out = model(values.to(model.device, model.dtype), output_hidden_states=True)
        return torch.cat(out.hidden_states).float().cpu()


def resample_features(states: torch.Tensor) -> torch.Tensor:
    """[L, T_50, C] -> [L, T_30, C] by linear interpolation with aligned corners (the reference's 30 fps)."""
    length = int(states.shape[1] / WAV2VEC_RATE * FEATURE_RATE)
    if length < 1:
        raise WanliteError("the audio is shorter than one video frame; give at least 1/16 s of sound")
    return F.interpolate(states.transpose(1, 2), size=length, mode="linear", align_corners=True).transpose(1, 2)


def frame_features(states30: torch.Tensor, fps: int, clip_frames: int) -> tuple[torch.Tensor, int]:
    """[L, T_30, C] -> ([L, C, clips * clip_frames], clips): the 30-fps column nearest each video frame
    (numpy's round-half-to-even, as the reference), zero columns past the audio's end; `clips` is how many
    whole clips of `clip_frames` the audio covers, counting the last partial one."""
    total = states30.shape[1]
    clips = int(total / (clip_frames * FEATURE_RATE / fps)) + 1
    frames = clips * clip_frames
    times = np.linspace(0, frames / fps, frames, endpoint=False)
    index = torch.from_numpy(np.round(times * FEATURE_RATE).astype(np.int64))
    out = torch.zeros(states30.shape[0], states30.shape[2], frames)
    valid = index < total
    out[:, :, valid] = states30[:, index[valid]].transpose(1, 2)
    return out, clips
