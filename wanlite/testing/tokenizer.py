"""A tiny umT5-style tokenizer (pad 0, eos 1, unk 2, `</s>` appended): one token per word of the caption grammar."""
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
    """Build a word-level tokenizer over `captions()` and save it where `AutoTokenizer.from_pretrained` finds it.
    Word-level keeps every caption word one token, which the tiny text encoder learns far more easily."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in umT5
    words = sorted({w for line in captions() for w in line.split()})
    vocab = {tok: i for i, tok in enumerate(specials + [f"\u2581{w}" for w in words])}
    if len(vocab) > vocab_size:
        raise ValueError(f"the caption grammar needs {len(vocab)} tokens, more than vocab_size {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder
