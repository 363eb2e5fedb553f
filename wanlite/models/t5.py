"""The umT5-XXL text encoder: transformers' `UMT5EncoderModel`, fed official `.pth` weights through a key map
(official `wan/modules/t5.py` names <-> transformers names), plus prompt cleaning and trimming to true length."""
from __future__ import annotations

import html
import re
from pathlib import Path

import torch

from wanlite.errors import CheckpointError
from wanlite.files import block_count
from wanlite.specs import T5_SPECS, T5Spec

# limits checked before anything is built from numbers a file declares
MAX_LAYERS = max(spec.num_layers for spec in T5_SPECS.values())  # no umT5 has more than umT5-XXL
MAX_WIDTH = 1 << 17
MAX_VOCAB = 1 << 20

# official (`models_t5_umt5-xxl-enc-bf16.pth`) -> transformers UMT5EncoderModel, per block
_BLOCK_MAP = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_MAP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_INVERSE = {v: k for k, v in _BLOCK_MAP.items()}
_TOP_INVERSE = {v: k for k, v in _TOP_MAP.items()}
_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def umt5_name_from_official(key: str) -> str:
    if key in _TOP_MAP:
        return _TOP_MAP[key]
    m = _OFFICIAL_BLOCK.match(key)
    if m and m[2] in _BLOCK_MAP:
        return f"encoder.block.{m[1]}.{_BLOCK_MAP[m[2]]}"
    return key  # unknown keys are reported by the loader, naming the file


def official_name_from_umt5(name: str) -> str | None:
    """Inverse map; the tied `encoder.embed_tokens.weight` (same tensor as `shared`) has no official name."""
    if name == "encoder.embed_tokens.weight":
        return None
    if name in _TOP_INVERSE:
        return _TOP_INVERSE[name]
    m = _HF_BLOCK.match(name)
    if m and m[2] in _BLOCK_INVERSE:
        return f"blocks.{m[1]}.{_BLOCK_INVERSE[m[2]]}"
    return name


def umt5_config(spec: T5Spec):
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=spec.vocab_size, d_model=spec.d_model, d_kv=spec.d_kv, d_ff=spec.d_ff, num_layers=spec.num_layers,
        num_heads=spec.num_heads, relative_attention_num_buckets=spec.relative_attention_num_buckets,
        relative_attention_max_distance=spec.relative_attention_max_distance, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, is_encoder_decoder=False)


def build_umt5(spec: T5Spec):
    """An encoder-only UMT5 (works under `with torch.device("meta")`)."""
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel(umt5_config(spec)).eval()


def official_umt5_manifest(spec: T5Spec) -> dict[str, list[int]]:
    """The state dict of the official `.pth` ({official key: shape}), computed on meta."""
    with torch.device("meta"):
        model = build_umt5(spec)
    out = {}
    for name, t in model.state_dict().items():
        official = official_name_from_umt5(name)
        if official is not None:
            out[official] = list(t.shape)
    return out


def t5_spec_from_shapes(shapes: dict[str, tuple[int, ...]], where="the text encoder file") -> T5Spec:
    """Read the encoder's hyper-parameters off transformers-named shapes, every number bounded first: the layer
    count its key names declare (at most umT5-XXL's, all of 0..n-1 present, so never more than the file has
    tensors), the widths it divides and unpacks (no zero, none past the limits)."""
    layers = block_count(shapes, _HF_BLOCK, MAX_LAYERS, where, "layer")
    block = "encoder.block.0.layer."
    needed = {"shared.weight": MAX_VOCAB, block + "0.SelfAttention.relative_attention_bias.weight": MAX_WIDTH,
              block + "0.SelfAttention.q.weight": MAX_WIDTH, block + "1.DenseReluDense.wi_0.weight": MAX_WIDTH}
    for key, limit in needed.items():
        shape = shapes.get(key)
        if shape is None:
            raise CheckpointError(f"{where}: not a umT5 encoder (tensor {key!r} is missing); check the file")
        if len(shape) != 2 or not all(1 <= d <= limit for d in shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(shape)}, which no umT5 encoder has; "
                                  "the file is damaged or for another model")
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes[block + "0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes[block + "0.SelfAttention.q.weight"][0]
    if inner % heads:
        raise CheckpointError(f"{where}: {heads} attention heads do not divide the attention width {inner}; "
                              "the file is damaged or for another model")
    d_ff = shapes[block + "1.DenseReluDense.wi_0.weight"][0]
    return T5Spec(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                  num_heads=heads, relative_attention_num_buckets=buckets)


def clean_prompt(text: str) -> str:
    """Official `clean='whitespace'`: fix mojibake when ftfy is installed, unescape HTML twice, collapse spaces."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(folder: Path):
    """The umT5 tokenizer from a local folder (`google/umt5-xxl/` or diffusers `tokenizer/`); never downloads and
    never runs code from the folder (see `wanlite.hf_folders`)."""
    from transformers import AutoTokenizer

    from wanlite.hf_folders import refuse_remote_code

    refuse_remote_code(folder, "umT5 tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 -- a damaged folder raises anything (JSON, sentencepiece and
        # tokenizers errors, bare Exceptions; the Rust tokenizers' panics are pyo3's PanicException, a BaseException)
        raise tokenizer_error(folder, exc) from None


def tokenizer_error(folder: Path, exc: BaseException) -> CheckpointError:
    """The one line for a tokenizer folder that fails to load or to tokenize."""
    first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"{folder}: cannot load the umT5 tokenizer ({first}); re-download it")


class TextEncoder:
    """Prompts -> per-prompt umT5 embeddings [L_i, d_model], trimmed to their true length (with EOS)."""

    def __init__(self, tokenizer, model, text_len: int = 512):
        self.tokenizer, self.model, self.text_len = tokenizer, model, text_len

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(clean_prompt(prompt), add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str], device=None) -> list[torch.Tensor]:
        # padding only to the longest prompt: padded positions are masked, so real tokens come out the same
        # as with the reference's 512-token padding, at a fraction of the cost
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="longest", truncation=True,
                               max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        device = device or next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return [h[: int(n)] for h, n in zip(hidden, mask.sum(dim=1))]
