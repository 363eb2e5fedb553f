"""Retrain one bundled tiny model with a changed recipe and measure what it learned; the bundle is untouched.

Usage: python bench/research/tiny_recipe.py --task tiny-ti2v --set trail=true anywhere=false sigma_shift=1 sprite_weight=1
           dit_steps=2400 [--name NAME] [--seeds 2] [--out DIR | --trained DIR]
Trains with `wanlite.tiny.train` (same code, seed and one thread as the bundle, the named `TinyRecipe` fields
replaced) into DIR (default: a scratch folder), then measures direction following on two threads: tiny-t2v from
text; tiny-ti2v from text and from a first frame in each placement of `wanlite.eval.first_frame` (ahead, against,
corner: only the corner leaves the direction to the prompt of a model trained with trails or room for the
motion), plus the direction-word probe of bench/caption_probe.py. Writes bench/research/results/tiny_recipe_<name>.json.
About 20 minutes of training for either model on 2 CPU cores, and a few minutes of measuring; `--trained DIR`
measures a folder trained before with the same settings (by `--out`, or `python -m wanlite.tiny.train` with the
recipe edited) and skips the training.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import RESEARCH_RESULTS, write_json  # noqa: E402
from caption_probe import probe  # noqa: E402

from wanlite.eval import DEFAULT_PROMPTS, OPPOSITE, run_suite, summarize  # noqa: E402
from wanlite.tiny import train as tiny_train  # noqa: E402

TRUE_WORDS = {"true": True, "false": False}
OFF_AT_ZERO = {"clean_first_frame", "shared_base_steps"}


def parse_field(item: str, recipe) -> tuple[str, object]:
    name, sep, text = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(recipe) if f.type in ("bool", "float", "int")}
    if not sep or name not in fields:
        raise ValueError(f"--set {item!r}: use FIELD=VALUE with FIELD one of {', '.join(fields)}")
    kind = fields[name].type
    try:
        if kind == "bool":
            return name, TRUE_WORDS[text.lower()]
        value = float(text) if kind == "float" else int(text)
    except (KeyError, ValueError):
        raise ValueError(f"--set {item!r}: {name} takes {'an' if kind == 'int' else 'a'} {kind}") from None
    # sizes, steps, rates, scales and weights divide or count: positive; the options that are off at 0 may be 0
    if value < 0 or (value == 0 and name not in OFF_AT_ZERO):
        raise ValueError(f"--set {item!r}: {name} must be {'at least 0' if name in OFF_AT_ZERO else 'positive'}")
    return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=list(tiny_train.RECIPES))
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="recipe fields to replace")
    parser.add_argument("--name", help="result name (default: task and settings)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", help="keep the trained checkpoint here")
    parser.add_argument("--trained", help="a checkpoint folder already trained with these settings")
    args = parser.parse_args()
    base = tiny_train.RECIPES[args.task]
    try:
        changes = dict(parse_field(item, base) for item in args.set)
    except ValueError as err:
        parser.error(str(err))
    recipe = dataclasses.replace(base, **changes)
    name = args.name or "_".join([args.task.replace("-", "_")] + [f"{k}{v}" for k, v in changes.items()])
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1")
    if args.out and args.trained:
        parser.error("--out trains into a folder, --trained reuses one: give one of them")
    scratch = None if args.out or args.trained else tempfile.TemporaryDirectory(prefix="wanlite-recipe-")
    started = time.perf_counter()
    train_seconds = None
    # training and the suites' first frames (trail or not) read the recipe from this table
    tiny_train.RECIPES[args.task] = recipe
    if args.trained:
        ckpt = Path(args.trained)
    else:
        out = Path(args.out or scratch.name)
        train_seconds = tiny_train.train_with_threads(recipe, out, seed=0, threads=1)["seconds"]
        ckpt = out / args.task
    torch.set_num_threads(2)
    seeds = tuple(range(args.seeds))
    suites = {}
    placements = (None, "ahead", "against", "corner") if args.task == "tiny-ti2v" else (None,)  # None: from text
    for placement in placements:
        clips = run_suite({"fp32": {"ckpt_dir": str(ckpt)}}, prompts=DEFAULT_PROMPTS, seeds=seeds, task=args.task,
                          image=placement is not None, placement=placement or "ahead")
        row = summarize(clips)[0]
        if placement == "against":
            row["follows_image"] = round(sum(c.measured == OPPOSITE[c.direction] for c in clips) / len(clips), 3)
        suites[placement or "text"] = {"direction_accuracy": row["direction_accuracy"],
                                       "mean_distance_px": row["mean_distance_px"],
                                       "colour_in_one_piece": row["colour_in_one_piece"],
                                       **({"follows_image": row["follows_image"]} if "follows_image" in row else {}),
                                       "clips": [(c.colour, c.direction, c.seed, c.measured) for c in clips]}
        print(f"{placement or 'text'}: direction accuracy {row['direction_accuracy']:.3f}", flush=True)
    rows = probe(args.task, ckpt, recipe, first_frame=args.task == "tiny-ti2v")
    write_json(f"tiny_recipe_{name}", {
        "task": args.task, "changes": changes, "recipe": dataclasses.asdict(recipe),
        "train_seconds": train_seconds, "checkpoint": args.trained or "trained by this run",
        "total_seconds": round(time.perf_counter() - started, 1),
        "suites": suites, "direction_probe": rows}, RESEARCH_RESULTS)
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
