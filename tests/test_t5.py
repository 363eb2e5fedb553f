import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from wanlite.errors import CheckpointError
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import load_t5
from wanlite.models.t5 import (TextEncoder, build_umt5, clean_prompt, load_tokenizer, official_name_from_umt5,
                               official_umt5_manifest, t5_spec_from_shapes)
from wanlite.specs import T5_SPECS, TINY_T5
from wanlite.testing.tokenizer import write_tiny_tokenizer
from wanlite.tiny import checkpoint_dir


def test_manifest_matches_official(manifests):
    manifest = official_umt5_manifest(T5_SPECS["umt5-xxl-encoder"])
    assert manifest == manifests["umt5-xxl-encoder"]
    assert sum(torch.Size(s).numel() for s in manifest.values()) == 5_680_910_336


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = build_umt5(TINY_T5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _hf_tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


@pytest.mark.parametrize("naming", ["official-pth", "hf-safetensors"])
def test_loaded_encoder_matches_transformers_forward(reference, tmp_path, naming):
    if naming == "official-pth":
        torch.save({official_name_from_umt5(k): v for k, v in _hf_tensors(reference).items()},
                   tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    else:
        save_file(_hf_tensors(reference), str(tmp_path / "umt5_xxl_fp32.safetensors"))
    ckpt = discover(tmp_path)
    assert ckpt.t5 is not None and ckpt.t5.naming == ("official" if naming == "official-pth" else "hf")
    loaded = load_t5(ckpt.t5, dtype=torch.float32)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight  # the tie survives streaming
    ids = torch.randint(3, TINY_T5.vocab_size, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_err(got, want) <= 1e-4


def test_spec_inferred_from_shapes(reference):
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert t5_spec_from_shapes(shapes) == TINY_T5


def test_text_encoder_trims_to_true_length(reference, tmp_path):
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    encoder = TextEncoder(tokenizer, reference, text_len=16)
    long, short = "a red square moving right on a black background", "a  blue &amp; circle"
    out = encoder.encode([long, short])
    assert [o.shape for o in out] == [(encoder.count_tokens(long), 64), (encoder.count_tokens(short), 64)]
    assert encoder.count_tokens(long) == len(tokenizer.tokenize(long)) + 1 >= 10  # sentencepiece pieces + </s>
    # a prompt alone gives the same rows as in a padded batch (padding is masked)
    alone = encoder.encode([short])[0]
    assert rel_err(alone, out[1]) < 1e-5
    assert clean_prompt("  a \n red&amp;amp;square ") == "a red&square"


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(CheckpointError, match="cannot load the umT5 tokenizer"):
        load_tokenizer(tmp_path / "nope")


class Panic(BaseException):
    """What the Rust tokenizers' panics surface as (pyo3's PanicException derives from BaseException)."""


def raising(exc: BaseException):
    def from_pretrained(folder, **kw):
        raise exc
    return from_pretrained


@pytest.mark.parametrize("raised", [KeyError("model"), Exception("data did not match any variant"),
                                    Panic("index out of bounds"), RuntimeError("")])
def test_any_error_from_a_damaged_tokenizer_folder_is_one_line(monkeypatch, raised):
    import transformers

    folder = checkpoint_dir("tiny-t2v") / "google" / "umt5-xxl"
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", raising(raised))
    with pytest.raises(CheckpointError, match=r"umt5-xxl: cannot load the umT5 tokenizer \(.+\); re-download it"):
        load_tokenizer(folder)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is never hidden
        load_tokenizer(folder)
