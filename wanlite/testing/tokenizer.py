"""A tiny umT5-style sentencepiece tokenizer (pad 0, eos 1, unk 2, `</s>` appended) trained on the caption grammar."""
from __future__ import annotations

import itertools
from pathlib import Path

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
SHAPES = ("square", "circle", "triangle", "ball", "box", "cat", "dog", "car")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "standing still", "spinning", "jumping")
BACKGROUNDS = ("black", "white", "grey", "blue")


def captions() -> list[str]:
    """The caption grammar of the bundled tiny models: '<a colour shape> <motion> on a <bg> background'."""
    lines = [f"a {c} {s} {m} on a {b} background"
             for c, s, m, b in itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS)]
    lines += [f"a {c1} {s1} and a {c2} {s2}" for (c1, s1), (c2, s2)
              in itertools.combinations(itertools.product(COLOURS[:4], SHAPES[:4]), 2)]
    return lines


def write_tiny_tokenizer(folder: Path, vocab_size: int = 384) -> Path:
    """Train a sentencepiece model on `captions()` and save it like `google/umt5-xxl/` (spiece.model plus the
    transformers files), so `AutoTokenizer.from_pretrained` loads it offline. BPE rather than unigram: on a corpus
    this small, unigram training prunes down to single characters, while BPE keeps each grammar word one piece."""
    import io

    import sentencepiece
    from transformers import T5Tokenizer

    pieces = min(256, vocab_size)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions()), model_writer=model, model_type="bpe", vocab_size=pieces,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # umT5's special ids
        character_coverage=1.0, num_threads=1, minloglevel=2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer.from_pretrained(str(folder), extra_ids=0).save_pretrained(str(folder))
    return folder
