"""Peak RAM of loading a quantized local prompt extender (`--prompt_extend_method local_qwen`): quantized while
transformers loads it (wanlite's loader) against read in full and quantized afterwards (the loader before it).

Random Qwen2 chat models with Qwen2.5-3B's layer shapes (hidden 2048, MLP 11008, 16 heads, 2 KV heads, vocab
16384) and a few decoder layers each are written in bf16 with a word-level tokenizer. Each mode runs in a fresh
subprocess whose RSS a thread samples every 10 ms (bench/harness.py), from after the imports to the loaded model:
- after-load:<quant>: `from_pretrained`, then `quantize_` on the decoder Linears (the previous loader);
- while-loading:<quant>: `load_local` (each weight quantized as transformers sets it, read with pread).
Each mode's last-position logits for a fixed prompt are kept; the two modes of a run must agree.
Writes bench/results/prompt_extend_load.json.
Usage: python bench/prompt_extend_load.py [--workdir DIR] [--runs int8:2,int8:8,gguf-q4_k:2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from harness import run_measured, write_json

SHAPES = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
              vocab_size=16384, tie_word_embeddings=False)
WORDS = "a the red blue cat dog runs walks on grass in snow light camera slowly moving scene".split()

MAKE = r"""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
folder, layers, shapes, words = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
core = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*special, "[UNK]", *words])}, unk_token="[UNK]"))
core.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                    unk_token="[UNK]")
tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
tokenizer.save_pretrained(folder)
config = Qwen2Config(num_hidden_layers=layers, eos_token_id=tokenizer.eos_token_id, **shapes)
with torch.device("meta"):
    model = Qwen2ForCausalLM(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():  # Qwen's init scale; norms at 1
        p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
model.save_pretrained(folder)
print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
"""

CHILD = r"""
import torch
from transformers import AutoModelForCausalLM
from wanlite.pipelines.job import PromptExtendPlan
from wanlite.pipelines.prompt_extend import decoder_linear, load_local
from wanlite.quant import parse_quant, quantize_
folder, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
strategy, _, quant = mode.partition(":")
torch.set_num_threads(2)
base = reset_peak()
start = time.perf_counter()
if strategy == "after-load":
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True)
    quantize_(model, parse_quant(quant), filter_fn=decoder_linear)
else:
    plan = PromptExtendPlan("local_qwen", folder, "en", False, device="cpu", quant=quant)
    model = load_local(plan, "bf16", lambda event: None)[0]
seconds = time.perf_counter() - start
stop_sampling()
# once loaded: RSS in file pages (the mapped safetensors) and in memory of the process's own
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
file_rss, anon_rss = (int(status[k].split()[0]) * 1024 for k in ("RssFile", "RssAnon"))
with torch.no_grad():
    logits = model(torch.arange(4, 20)[None]).logits[0, -1].float()
torch.save(logits, out)
print(json.dumps({"peak_rss": peak[0], "base_rss": base, "load_s": seconds, "file_rss": file_rss,
                  "anon_rss": anon_rss}))
"""


def write_model(folder: Path, layers: int) -> None:
    import json
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([sys.executable, "-c", "import json, sys\nfrom pathlib import Path\n" + MAKE, str(folder),
                           str(layers), json.dumps(SHAPES), *WORDS], capture_output=True, text=True, check=True)
    print(folder.name, made.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the models are written (default: a temp dir)")
    parser.add_argument("--runs", default="int8:2,int8:8,gguf-q4_k:2",
                        help="QUANT:LAYERS,... (GGUF Q4_K quantizes at a few MB/s here: few layers)")
    args = parser.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for run in args.runs.split(","):
            quant, _, layers = run.partition(":")
            folder = work / f"qwen2-{layers}l"
            if not (folder / "model.safetensors").is_file():
                write_model(folder, int(layers))
            logits = {}
            for strategy in ("after-load", "while-loading"):
                out = work / f"{strategy}-{quant}-{layers}l.pt"
                got = run_measured(CHILD, [folder, f"{strategy}:{quant}", out], interval=0.01)
                logits[strategy] = torch.load(out)
                rows.append({"mode": strategy, "quant": quant, "layers": int(layers),
                             "bf16_file_gb": round((folder / "model.safetensors").stat().st_size / 1e9, 3),
                             "peak_rss_gb": round(got["peak_rss"] / 1e9, 3),
                             "peak_above_start_gb": round((got["peak_rss"] - got["base_rss"]) / 1e9, 3),
                             "loaded_rss_file_gb": round(got["file_rss"] / 1e9, 3),
                             "loaded_rss_anon_gb": round(got["anon_rss"] / 1e9, 3), "load_s": round(got["load_s"], 1)})
                print(rows[-1])
            rows[-1]["logits_max_abs_diff_vs_after_load"] = float(
                (logits["after-load"] - logits["while-loading"]).abs().max())
    write_json("prompt_extend_load", {"model": SHAPES, "rows": rows})


if __name__ == "__main__":
    main()
