"""The planner's table: for every task x {480p, 720p} x the cards in GPUS x {16, 32, 64 GB RAM}, the plan it
chooses for that (described) machine and its predictions: peak VRAM, peak RAM, s/step.

Writes bench/results/plans.json and rewrites the hardware table in README.md between its markers.
Predicted, not measured: the memory figures come from formulas validated against traced allocations
(tests/test_planner.py); the times from the cards' published FLOP rates (wanlite/planner/gpus.py).
Usage: python bench/plans.py
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"480p": {"t2v-A14B": (832, 480), "i2v-A14B": (832, 480), "ti2v-5B": (832, 480), "s2v-14B": (832, 448),
                  "animate-14B": (832, 480)},
         "720p": {"t2v-A14B": (1280, 720), "i2v-A14B": (1280, 720), "ti2v-5B": (1280, 704), "s2v-14B": (1280, 704),
                  "animate-14B": (1280, 720)}}
TASK_ORDER = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "s2v-14B", "animate-14B")  # frames: per clip / segment for the last two
GPUS, RAMS = ("RTX 4060", "RTX 3060", "T4", "RTX 4080", "RTX 4090"), (16, 32, 64)
BEGIN, END = "<!-- plans table: begin (python bench/plans.py) -->", "<!-- plans table: end -->"


def main() -> int:
    from wanlite.errors import WanliteError
    from wanlite.planner import Workload, hypothetical, make_plan
    from wanlite.specs import TASKS

    rows = []
    for task in TASK_ORDER:
        spec = TASKS[task]
        passes = 2 if any(abs(g - 1.0) > 1e-6 for g in spec.guide_scale) else 1
        for res, sizes in SIZES.items():
            w, h = sizes[task]
            for gpu in GPUS:
                for ram in RAMS:
                    machine = hypothetical(None, ram, gpu=gpu)
                    row = {"task": task, "resolution": res, "size": [w, h], "frames": spec.frames, "gpu": gpu,
                           "vram_gb": round(machine.vram_total / 1e9), "ram_gb": ram}
                    try:
                        plan = make_plan(Workload(task, w, h, spec.frames, spec.steps, passes=passes), machine)
                        row.update(fits=True, plan=plan.summary(), quant=plan.quant, offload=plan.offload,
                                   resident_blocks=plan.resident_blocks, ram_mode=plan.ram_mode,
                                   chunk_tokens=plan.chunk_tokens, vae_tile=plan.vae_tile,
                                   predicted=plan.to_dict()["predicted"])
                    except WanliteError as exc:
                        row.update(fits=False, reason=str(exc))
                    rows.append(row)
    out = {"command": "python bench/plans.py", "machine": f"{platform.machine()} (planning only, no measurement)",
           "date": datetime.date.today().isoformat(),
           "note": "predictions for described machines (the cards' published figures, 2 GB/s disk)",
           "rows": rows}
    (ROOT / "bench" / "results" / "plans.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    table = markdown(rows)
    print(table)
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(head + BEGIN + "\n" + table + END + tail, encoding="utf-8")
    else:
        print("README.md has no plans-table markers; not updated", file=sys.stderr)
    return 0


def markdown(rows: list[dict]) -> str:
    """One line per task and resolution, one cell per VRAM size (RAM 32 GB; 16 and 64 GB noted where the
    plan changes): format, placement and predicted peak VRAM / s per step, or 'no'."""
    lines = ["| task | res | " + " | ".join(f"{g} ({next(r['vram_gb'] for r in rows if r['gpu'] == g)} GB)"
                                        for g in GPUS) + " |",
             "|---|---|" + "---|" * len(GPUS)]
    for task in TASK_ORDER:
        for res in SIZES:
            cells = []
            for gpu in GPUS:
                r = next(x for x in rows if x["task"] == task and x["resolution"] == res and x["gpu"] == gpu
                         and x["ram_gb"] == 32)
                if not r["fits"]:
                    cells.append("does not fit")
                    continue
                p = r["predicted"]
                where = r["offload"] if r["offload"] != "block" else f"block k={r['resident_blocks']}"
                low_ram = next(x for x in rows if x["task"] == task and x["resolution"] == res
                               and x["gpu"] == gpu and x["ram_gb"] == 16)
                note = "" if low_ram["fits"] else "; 16 GB RAM: no"
                cells.append(f"{r['quant']}, {where}, {p['peak_vram_gb']:.1f} GB, ~{p['s_per_step']:.0f} s/step{note}")
            lines.append(f"| {task} | {res} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
