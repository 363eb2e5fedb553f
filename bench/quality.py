"""Direction accuracy, wholeness of the shape, drift and time per clip of a bundled tiny model, per variant.

Usage: python bench/quality.py [--seeds N] [--task tiny-t2v|tiny-ti2v] [--i2v [--placement ahead|against|corner]]
Variants: the fp32 reference and bf16 weights/compute. Default: tiny-t2v text-to-video, written to
bench/results/quality.json (`--task tiny-ti2v`: tiny-ti2v from text, quality_ti2v.json);
--i2v: tiny-ti2v image-to-video from a rendered first frame per prompt
(`wanlite.eval.first_frame`), written to bench/results/quality_ti2v_i2v[_<placement>].json. `ahead` (default):
a start of a training clip of the prompt with room for the whole motion; `against`: drawn for the opposite
motion, to tell which of image and prompt the motion follows; `corner`: a still shape where the prompted and a
perpendicular motion fit alike, so only the prompt can tell.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from wanlite.eval import DEFAULT_PROMPTS, OPPOSITE, PLACEMENTS, as_dicts, run_suite, summarize

VARIANTS = {"fp32": {}, "bf16": {"dtype": "bf16"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--task", choices=("tiny-t2v", "tiny-ti2v"),
                        help="default: tiny-ti2v with --i2v, else tiny-t2v")
    parser.add_argument("--i2v", action="store_true", help="tiny-ti2v from a first frame instead of tiny-t2v")
    parser.add_argument("--placement", choices=PLACEMENTS, help="with --i2v: how the first frame is drawn")
    args = parser.parse_args()
    if args.placement and not args.i2v:
        parser.error("--placement needs --i2v")
    task = args.task or ("tiny-ti2v" if args.i2v else "tiny-t2v")
    if args.i2v and task != "tiny-ti2v":
        parser.error("--i2v needs --task tiny-ti2v (tiny-t2v has no image input)")
    placement = args.placement or "ahead"
    results = run_suite(VARIANTS, prompts=DEFAULT_PROMPTS, seeds=tuple(range(args.seeds)), reference="fp32",
                        task=task, image=args.i2v, placement=placement)
    rows = summarize(results)
    print(f"{'variant':8s} {'clips':>5s} {'direction':>9s} {'dist px':>8s} {'1 piece':>7s} {'s/clip':>7s} "
          f"{'PSNR':>7s} {'SSIM':>7s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['clips']:5d} {r['direction_accuracy']:9.3f} {r['mean_distance_px']:8.1f} "
              f"{r['colour_in_one_piece']:7.3f} {r['seconds_per_clip']:7.2f} "
              f"{r['psnr_vs_reference'] or float('nan'):7.2f} {r['ssim_vs_reference'] or float('nan'):7.4f}")
    for row in rows:
        if row["first_frame_psnr_min"] is not None:
            print(f"{row['variant']}: frame 0 against the given image, "
                  f"lowest PSNR {row['first_frame_psnr_min']:.1f} dB")
    if placement == "against":
        for row in rows:
            clips = [r for r in results if r.variant == row["variant"]]
            row["follows_image"] = round(sum(r.measured == OPPOSITE[r.direction] for r in clips) / len(clips), 3)
            print(f"{row['variant']}: moves the way the first frame shows in {row['follows_image']:.3f} of clips")
    stem = {"tiny-t2v": "quality", "tiny-ti2v": "quality_ti2v"}[task]
    if args.i2v:
        stem += "_i2v" + ("" if placement == "ahead" else f"_{placement}")
    out = Path(__file__).resolve().parent / "results" / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "task": task, "image_to_video": args.i2v, "first_frame_placement": placement if args.i2v else None,
        "summary": rows,
        "clips": as_dicts(results)}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
