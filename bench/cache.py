"""Step caching on the bundled tiny models: block evaluations saved, denoising speed-up, PSNR/SSIM vs the uncached
clip and direction accuracy, for each preset and a sweep of policies and thresholds; plus the bookkeeping
overhead on the full-size A14B block.

Usage:
    python bench/cache.py [--task tiny-t2v] [--seeds 2] [--only SUBSTRING]   # the sweep (appends/replaces rows)
    python bench/cache.py --calibrate            # the MagCache curves shipped for the tiny models (cache/curves)
    python bench/cache.py --overhead             # bookkeeping vs one full-size A14B block (random weights, CPU)
    python bench/cache.py --timing               # presets: uncached and cached runs alternated, median ratio
    python bench/cache.py --readme               # rewrite the cache tables in docs/caching.md from cache.json
Every clip is generated with and without the cache in the same process (same prompts and seeds: the harness of
wanlite.eval; tiny-t2v from text, tiny-ti2v from a first frame, see FROM_IMAGE); speed-up is the ratio of the
sampling loop's wall time (the sweep's is indicative: a busy machine skews it; --timing alternates the two runs
clip by clip and replaces the presets' value).
Writes bench/results/cache.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from wanlite.cache import PRESETS, DBCacheConfig, MagCacheConfig, TaylorSeerConfig, describe
from harness import RESULTS, machine, write_json
from wanlite.eval import DEFAULT_PROMPTS, prompt_for, run_suite, summarize, write_first_frame

OUT = RESULTS / "cache.json"
CURVES = Path(__file__).resolve().parents[1] / "cache" / "curves"
TASKS = ("tiny-t2v", "tiny-ti2v")
# tiny-ti2v is measured from a first frame: it follows the prompt there (16 of 16 clips) and from text in 2 of 8,
# so only image-to-video makes "direction kept" mean something
FROM_IMAGE = {"tiny-t2v": False, "tiny-ti2v": True}


def image_for(task: str, folder: Path, colour: str, direction: str, seed: int) -> dict[str, Path]:
    """generate()'s `image=` for a clip of `task` as the sweep runs it: none from text."""
    return {"image": write_first_frame(folder, task, colour, direction, seed)[0]} if FROM_IMAGE[task] else {}


def sweep() -> dict[str, object]:
    """name -> the `cache=` argument of generate()."""
    variants: dict[str, object] = {f"preset {name}": name for name in PRESETS}
    for thr in (0.05, 0.1, 0.2, 0.3, 0.5):
        variants[f"dbcache F1B0 t={thr}"] = DBCacheConfig(threshold=thr)
        variants[f"dbcache F1B0 t={thr} mcc2"] = DBCacheConfig(threshold=thr, max_consecutive_cached=2)
        variants[f"dbcache F1B0 t={thr} ts1"] = DBCacheConfig(threshold=thr, taylorseer=TaylorSeerConfig(order=1))
    for interval in (2, 3, 4):
        for order in (0, 1, 2):
            variants[f"taylorseer n={interval} o={order}"] = TaylorSeerConfig(order=order, interval=interval)
    for thr in (0.05, 0.1, 0.2, 0.4):
        for k in (2, 3):
            variants[f"magcache t={thr} K={k}"] = MagCacheConfig(threshold=thr, max_skip_steps=k)
    return variants


def save(rows: list[dict], extra: dict | None = None) -> None:
    """Merge rows into cache.json (same task + config replaces), atomically."""
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"results": []}
    keep = [r for r in data.get("results", [])
            if (r.get("task"), r.get("config")) not in {(n.get("task"), n.get("config")) for n in rows}]
    data.update({"command": "python bench/cache.py " + " ".join(sys.argv[1:]),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": machine(), "results": keep + rows, **(extra or {})})
    write_json("cache", data)


def run_sweep(task: str, seeds: int, only: str | None, group: int = 6) -> None:
    """Variants in groups, each group with its own uncached reference run just before (fair timing on a busy
    machine); rows are saved after every group."""
    variants = {name: cache for name, cache in sweep().items() if only is None or only in name}
    names = list(variants)
    for first in range(0, len(names), group):
        runs = {"uncached": {}, **{name: {"cache": variants[name]} for name in names[first:first + group]}}
        clips = run_suite(runs, prompts=DEFAULT_PROMPTS, seeds=tuple(range(seeds)), reference="uncached", task=task,
                          image=FROM_IMAGE[task])
        base, *cached_rows = summarize(clips)
        rows = []
        for cached in cached_rows:
            name = cached["variant"]
            cache = variants[name]
            rows.append({
                "task": task, "image_to_video": FROM_IMAGE[task], "config": name,
                "preset": cache if isinstance(cache, str) else None,
                "settings": describe(PRESETS[cache] if isinstance(cache, str) else cache), "clips": cached["clips"],
                "block_evals_saved_x": cached["block_evals_saved_x"],
                "speedup_x": round(base["denoise_seconds_per_clip"] / cached["denoise_seconds_per_clip"], 3),
                "psnr_db": cached["psnr_vs_reference"], "ssim": cached["ssim_vs_reference"],
                "direction_accuracy": cached["direction_accuracy"],
                "uncached_direction_accuracy": base["direction_accuracy"]})
            row = rows[-1]
            print(f"{task:9s} {name:30s} evals saved {row['block_evals_saved_x']:5.2f}x  speed-up "
                  f"{row['speedup_x']:5.2f}x  PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.4f}  direction "
                  f"{row['direction_accuracy']:.3f} (uncached {row['uncached_direction_accuracy']:.3f})", flush=True)
        save(rows)


def calibrate() -> None:
    """One uncached clip per tiny task, run as the sweep runs it, with `cache="calibrate"`; the curve is shipped in
    cache/curves."""
    from wanlite import generate
    from wanlite.tiny import checkpoint_dir

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["XDG_CACHE_HOME"] = os.environ["LOCALAPPDATA"] = scratch
        for task in TASKS:
            out = generate(task=task, prompt=prompt_for("red", "right"), seed=0, dtype="fp32",
                           ckpt_dir=checkpoint_dir(task), cache="calibrate", save_file=Path(scratch) / "c.mp4",
                           **image_for(task, Path(scratch), "red", "right", 0))
            CURVES.mkdir(exist_ok=True)
            shutil.copyfile(out.cache["calibration"], CURVES / f"{task}.json")
            print(f"{task}: wrote {CURVES / f'{task}.json'}")


def overhead(reps: int = 5) -> None:
    """Time one full-size A14B block and the cache's own work around the blocks (the inner runner replaced by
    an identity), for a computed and a cached step, on the same token count."""
    from wanlite.cache import StepCache
    from wanlite.models.blocks import BlockInputs, WanBlock
    from wanlite.models.rope import rope_cos_sin
    from wanlite.specs import DIT_SPECS

    spec = DIT_SPECS["t2v-A14B"]
    torch.manual_seed(0)
    block = WanBlock(spec.dim, spec.ffn_dim, spec.num_heads, spec.eps).to(torch.bfloat16).eval()
    rows = []
    for grid in ((1, 8, 8), (2, 16, 16)):
        tokens = grid[0] * grid[1] * grid[2]
        x = torch.randn(2, tokens, spec.dim, dtype=torch.bfloat16)
        inputs = BlockInputs(torch.randn(2, 1, 6, spec.dim), torch.randn(2, spec.text_len, spec.dim,
                                                                         dtype=torch.bfloat16),
                             rope_cos_sin(grid, spec.head_dim))
        with torch.no_grad():
            block(x, inputs)
            started = time.perf_counter()
            for _ in range(reps):
                block(x, inputs)
            block_s = (time.perf_counter() - started) / reps

            def identity(blocks, h, inp, start=0, stop=None):
                return h + 0  # a fresh tensor, as a real range returns

            blocks = [None] * spec.num_layers
            timings = {}
            for name, threshold in (("computed", 1e-12), ("cached", 1e9)):
                cache = StepCache(DBCacheConfig(front_blocks=1, threshold=threshold, warmup_steps=1,
                                                taylorseer=TaylorSeerConfig(order=1)))
                cache.run(identity, "main", blocks, x, inputs)  # the warm-up step fills the state
                started = time.perf_counter()
                for _ in range(reps):
                    cache.run(identity, "main", blocks, x, inputs)
                timings[name] = (time.perf_counter() - started) / reps - 3 * _identity_cost(x)
        row = {"task": "t2v-A14B block", "config": f"overhead {tokens} tokens", "tokens": tokens, "batch": 2,
               "block_seconds": round(block_s, 4),
               "bookkeeping_seconds": {k: round(v, 6) for k, v in timings.items()},
               "overhead_of_one_block": {k: round(v / block_s, 5) for k, v in timings.items()}}
        print(f"A14B block, {tokens} tokens x 2: block {block_s * 1e3:.1f} ms; cache bookkeeping per step "
              + ", ".join(f"{k} {v * 1e3:.2f} ms ({v / block_s:.2%} of a block)" for k, v in timings.items()),
              flush=True)
        rows.append(row)
    save(rows)


def timing(task: str, reps: int = 8) -> None:
    """Per preset: the same clip uncached then cached, `reps` times over the prompts; the median ratio of the
    sampling loop's time (robust to a machine whose load drifts)."""
    from statistics import median

    from wanlite import generate
    from wanlite.tiny import checkpoint_dir

    def denoise_seconds(**kw) -> float:
        steps = []
        generate(task=task, ckpt_dir=checkpoint_dir(task), dtype="fp32", output_dir=scratch,
                 progress=lambda e: steps.append(e["elapsed"]) if e.get("event") == "step" else None, **kw)
        return steps[-1]

    data = json.loads(OUT.read_text())
    with tempfile.TemporaryDirectory() as scratch:
        for name in PRESETS:
            ratios = []
            for i in range(reps):
                colour, direction = DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]
                kw = dict(prompt=prompt_for(colour, direction), seed=i,
                          **image_for(task, Path(scratch), colour, direction, i))
                ratios.append(denoise_seconds(**kw) / denoise_seconds(cache=name, **kw))
            for row in data["results"]:
                if row.get("task") == task and row.get("config") == f"preset {name}":
                    row["speedup_x"] = round(median(ratios), 3)
                    row["speedup_method"] = f"median of {reps} alternated uncached/cached clips"
            print(f"{task} preset {name}: denoising speed-up {median(ratios):.2f}x "
                  f"(ratios {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    write_json("cache", data)


BEGIN, END = "<!-- cache table: begin (python bench/cache.py --readme) -->", "<!-- cache table: end -->"


def readme() -> None:
    """The presets per tiny task, then the sweep's rows that were not beaten on both saving and PSNR."""
    rows = [r for r in json.loads(OUT.read_text())["results"] if "block_evals_saved_x" in r]
    lines = ["| task | cache | block evals saved | denoising speed-up | PSNR vs uncached | SSIM | direction acc. "
             "(uncached) |", "|---|---|---|---|---|---|---|"]
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        presets = [r for r in mine if r.get("preset")]
        preset_settings = [r["settings"] for r in presets]
        frontier = [r for r in mine if not r.get("preset") and r["settings"] not in preset_settings
                    and r["block_evals_saved_x"] >= 1.05 and not any(
                        o["block_evals_saved_x"] >= r["block_evals_saved_x"] and o["psnr_db"] > r["psnr_db"]
                        for o in mine if o is not r)]
        for r in presets + sorted(frontier, key=lambda r: r["block_evals_saved_x"]):
            name = f"**{r['preset']}**" if r.get("preset") else r["config"]
            label = f"{task} I2V" if r.get("image_to_video") else task
            speed = f"{r['speedup_x']:.2f}x" if "speedup_method" in r else "—"  # sweep timings: a busy machine
            lines.append(f"| {label} | {name} | {r['block_evals_saved_x']:.2f}x | {speed} | "
                         f"{r['psnr_db']:.1f} dB | {r['ssim']:.3f} | {r['direction_accuracy']:.3f} "
                         f"({r['uncached_direction_accuracy']:.3f}) |")
    table = "\n".join(lines) + "\n"
    print(table)
    path = Path(__file__).resolve().parents[1] / "docs" / "caching.md"
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        path.write_text(head + BEGIN + "\n" + table + END + rest.split(END, 1)[1], encoding="utf-8")
    else:
        print("docs/caching.md has no cache-table markers; not updated", file=sys.stderr)


def _identity_cost(x: torch.Tensor, reps: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(reps):
        x + 0
    return (time.perf_counter() - started) / reps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default=None, help="default: both tiny tasks")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", default=None, help="run the variants whose name contains this")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    if args.calibrate:
        calibrate()
    elif args.overhead:
        overhead()
    elif args.timing:
        for task in [args.task] if args.task else TASKS:
            timing(task)
    elif args.readme:
        readme()
    else:
        for task in [args.task] if args.task else TASKS:
            run_sweep(task, args.seeds, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
