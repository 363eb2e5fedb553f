"""The `wanlite` command (installed as `wanlite.cli`; `python cli.py ...` from a clone behaves the same)."""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def info_video(path: str, as_json: bool) -> int:
    from pathlib import Path

    from wanlite.errors import WanliteError
    from wanlite.pipelines.video_io import read_mp4_metadata

    if not Path(path).is_file():
        raise WanliteError(f"{path} does not exist")
    try:
        meta = read_mp4_metadata(Path(path))
    except ValueError as exc:
        raise WanliteError(str(exc)) from None
    if meta is None:
        raise WanliteError(f"{path} carries no wanlite settings (not made by wanlite, or re-encoded)")
    if as_json:
        print(json.dumps(meta, indent=1, ensure_ascii=False))
    else:
        for key, value in _flat(meta):
            print(f"{key:28s} {value}")
    return 0


def _flat(record: dict, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested record (the job's offload mode is `job.offload.mode`)."""
    for key, value in record.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def cmd_info(args) -> int:
    from wanlite.archs import ARCHS, manifest
    from wanlite.errors import WanliteError
    from wanlite.quant import FORMATS, weight_bytes

    if args.file is not None:
        return info_video(args.file, args.json)
    if args.arch is None:
        raise WanliteError("wanlite info needs FILE.mp4 or --arch NAME")
    if args.arch not in ARCHS:
        raise WanliteError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    shapes = manifest(args.arch)
    params = sum(math.prod(s) for s in shapes.values())
    sizes = {fmt: weight_bytes(shapes, fmt) for fmt in FORMATS}
    if args.json:
        print(json.dumps({"arch": args.arch, "parameters": params, "keys": len(shapes), "bytes": sizes,
                          "manifest": {k: list(v) for k, v in shapes.items()}}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.arch}: {params:,} parameters, {len(shapes)} tensors")
    table.add_column("weights")
    table.add_column("size", justify="right")
    table.add_column("notes")
    for fmt, spec in FORMATS.items():
        table.add_row(fmt, _gb(sizes[fmt]), spec.note)
    Console().print(table)
    return 0


def cmd_check(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from wanlite.loading.checkpoints import COMPONENT_FLAGS, discover, with_components
    from wanlite.loading.models import check_checkpoint
    from wanlite.specs import TASKS

    locate_checkpoint(args)
    files = {flag: Path(getattr(args, flag)) for flag in COMPONENT_FLAGS if getattr(args, flag, None) is not None}
    ckpt = with_components(discover(args.ckpt_dir), files)
    found = check_checkpoint(ckpt, args.task)
    table = Table(title=f"{args.task} checkpoint in {ckpt.root}")
    for col in ("component", "layout", "files", "stored as", "parameters"):
        table.add_column(col)
    for label, comp, prepared in found:
        dtypes = sorted(set(prepared.source.formats().values()))
        params = sum(p.numel() for p in prepared.model.parameters())
        where = comp.where.relative_to(ckpt.root) if comp.where != ckpt.root else comp.where.name
        table.add_row(label, comp.layout, f"{len(comp.files)} x {where}", ",".join(dtypes), f"{params:,}")
    table.add_row("tokenizer", "", str(ckpt.tokenizer.relative_to(ckpt.root)), "", "")
    if TASKS[args.task].conditioning == "speech":
        from wanlite.pipelines.speech import find_wav2vec

        table.add_row("wav2vec2", "transformers", str(find_wav2vec(ckpt.root).relative_to(ckpt.root)), "", "")
    if TASKS[args.task].conditioning == "animate":
        from wanlite.loading.clip import load_clip_vision
        from wanlite.models.clip import find_clip

        clip = find_clip(ckpt.root)  # checked like the rest: every tensor the vision tower needs, right shapes
        params = sum(p.numel() for p in load_clip_vision(clip).parameters())
        table.add_row("CLIP image encoder", "official", clip.name, "", f"{params:,}")
        from wanlite.animate_prep import prep_model_paths

        for name, path in prep_model_paths(ckpt.root).items():  # optional: only `wanlite animate-prep` uses them
            table.add_row(f"prep {name}", "optional", path.name if path.is_file() else "missing", "", "")
    Console().print(table)
    print(f"ok: every {args.task} component is present and its tensor names and shapes match")
    return 0


def download_format(task: str, vram: float | None, ram: float | None, gpu: str | None = None) -> tuple[str, str]:
    """(download format, why) for the weight format the planner picks for `task` on a card named `gpu` and/or of
    `vram` GB (neither: this machine, measured as `generate` measures it)."""
    from wanlite.loading.hub import PLANNED
    from wanlite.planner import Workload, hardware_for, hypothetical, make_plan
    from wanlite.specs import TASKS

    if vram is not None or gpu is not None:
        hw = hypothetical(vram, ram if ram is not None else 32, gpu=gpu)
    else:
        import torch

        hw = hardware_for({} if ram is None else {"ram_gb": ram}, torch.device("cuda" if torch.cuda.is_available()
                                                                                else "cpu"))
    spec = TASKS[task]
    plan = make_plan(Workload(task, *spec.size, spec.frames, spec.steps), hw)
    planned = "bf16" if plan.weight_format == "auto" else plan.weight_format  # no GPU: 16-bit weights as stored
    return PLANNED[planned], f"the plan for {hw.describe()} runs {planned}"


def cmd_download(args) -> int:
    from pathlib import Path

    from wanlite.errors import WanliteError
    from wanlite.loading import hub

    if args.format != "auto" and (args.vram is not None or args.ram is not None or args.gpu is not None):
        raise WanliteError("--gpu / --vram / --ram choose the format with --format auto; drop them or the --format")
    fmt, why = (download_format(args.task, args.vram, args.ram, args.gpu) if args.format == "auto"
                else (args.format, ""))
    items = hub.wants(args.task, fmt, args.lora)
    to = Path(args.to) if args.to is not None else hub.destination(args.task, fmt)
    if to.exists() and not to.is_dir():
        raise WanliteError(f"--to {to} is a file; name a folder")
    if not args.dry_run:
        hub.ensure_online()
    fetches = hub.resolve_wants(items, args.endpoint, offline=args.dry_run)
    print("\n".join(hub.describe(args.task, fmt, fetches, why, to)))
    if args.dry_run:
        print("dry run: nothing fetched; ~ sizes are estimates (online, the repos' listings give the files and sizes)")
        return 0
    hub.check_space(fetches, to)
    hub.download(fetches, to, args.endpoint)
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import check_checkpoint

    check_checkpoint(discover(to), args.task)
    print(f"ok: every {args.task} component arrived and its tensor names and shapes match")
    loras = " ".join(f"--lora_{'high' if 'high' in f.role else 'low'} {to / f.subdir / f.path}"
                     for f in fetches if f.subdir)
    preset = " --preset lightning" if loras else ""  # the distillation LoRAs run 4 steps without guidance
    print(f'next: wanlite generate --task {args.task} --ckpt_dir {to}{preset} --prompt "..." {loras}'.rstrip())
    return 0


def locate_checkpoint(args) -> None:
    """`check` / `convert`: `--ckpt_dir` as a repo id or a ComfyUI models folder (generate and plan locate it in
    `resolve`), its files for the task becoming the component flags the user did not give."""
    from wanlite.loading.checkpoints import COMPONENT_FLAGS, locate

    given = {flag for flag in COMPONENT_FLAGS if getattr(args, flag, None) is not None}
    root, picked = locate(args.ckpt_dir, args.task, given)
    args.ckpt_dir = str(root)
    for flag, path in picked.items():
        setattr(args, flag, str(path))


def cmd_animate_prep(args) -> int:
    from pathlib import Path

    from wanlite.animate_prep import PrepOptions, animate_prep

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = PrepOptions(replace=args.replace, area=tuple(args.resolution_area), fps=args.fps,
                          dilate_iterations=args.iterations, dilate_kernel=args.k, grid=(args.w_len, args.h_len),
                          mask_source=args.mask_source, retarget=args.retarget)
    if args.use_flux:
        print("note: --use_flux skipped: wanlite does not run FLUX.1-Kontext pose edits; retargeting uses the "
              "first frame and the character image as they are")
    written = animate_prep(Path(args.video), Path(args.ref), Path(args.out), Path(args.ckpt_path), options, device)
    print(f"wrote {', '.join(p.name for p in written)} to {Path(args.out)}")
    mode = " --replace" if args.replace else ""
    print(f"next: wanlite generate --task animate-14B --ckpt_dir DIR --src_root_path {args.out}{mode}")
    return 0


def _guide_scale(text: str | None):
    from wanlite.errors import WanliteError

    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise WanliteError(f"--sample_guide_scale {text!r} must be a number or LOW,HIGH") from None
    if len(values) not in (1, 2):
        raise WanliteError(f"--sample_guide_scale {text!r} must be a number or LOW,HIGH")
    return (values[0], values[-1])


def request_from_args(args, explicit: set[str] = frozenset(), needs_prompt: bool = True):
    """The Request the job flags describe: `generate` and `plan` read the same flags the same way. With
    `--replay FILE.mp4` the video's recorded request, with the flags in `explicit` (those typed) put over it."""
    from dataclasses import fields, replace

    from wanlite.errors import WanliteError
    from wanlite.pipelines.request import OFFICIAL_NAMES

    if args.replay is None:
        if args.task is None:
            raise WanliteError("pass --task TASK (or --replay FILE.mp4)")
        if args.prompt is None and needs_prompt:
            raise WanliteError("pass --prompt TEXT (or --replay FILE.mp4)")
        return _flags_request(args)
    from wanlite.pipelines.replay import recorded_request

    typed = _flags_request(args, task=args.task or "t2v-A14B")
    names = {f.name for f in fields(typed)}
    given = {OFFICIAL_NAMES.get(dest, dest) for dest in explicit} & names
    return replace(recorded_request(args.replay), **{name: getattr(typed, name) for name in given})


def _flags_request(args, task: str | None = None):
    from pathlib import Path

    from wanlite.loading.checkpoints import COMPONENT_FLAGS
    from wanlite.pipelines.request import Request, parse_size

    path = lambda value: None if value is None else Path(value)  # noqa: E731
    return Request(
        task=task or args.task, prompt=args.prompt or "", ckpt_dir=path(args.ckpt_dir), negative_prompt=args.negative_prompt,
        image=path(args.image), size=None if args.size is None else parse_size(args.size), frames=args.frame_num,
        steps=args.sample_steps, shift=args.sample_shift, guide_scale=_guide_scale(args.sample_guide_scale),
        solver=args.sample_solver, seed=args.base_seed, device=args.device, dtype=args.dtype,
        save_file=path(args.save_file), output_dir=Path(args.output_dir), preview=args.preview, t5_cpu=args.t5_cpu,
        quant=args.quant, quant_backend=args.quant_backend, vae_tile=args.vae_tile, vae_dtype=args.vae_dtype,
        profile=args.profile, offload=args.offload, resident_blocks=args.resident_blocks, prefetch=args.prefetch,
        ram_mode=args.ram_mode, chunk_tokens=args.chunk_tokens, offload_cache=path(args.offload_cache),
        cache=args.cache, cache_threshold=args.cache_threshold, cache_fn=args.cache_fn, cache_bn=args.cache_bn,
        taylorseer_order=args.taylorseer_order, cache_force=args.cache_force,
        lora=tuple(args.lora), lora_high=tuple(args.lora_high), lora_low=tuple(args.lora_low),
        lora_mode=args.lora_mode, preset=args.preset, audio=path(args.audio), pose_video=path(args.pose_video),
        num_clip=args.num_clip, start_from_ref=args.start_from_ref, wav2vec=path(args.wav2vec),
        src_root_path=path(args.src_root_path), replace=args.replace, refert_num=args.refert_num,
        relighting_lora=args.use_relighting_lora, attention=args.attention, cfg=args.cfg, compile=args.compile,
        use_prompt_extend=args.use_prompt_extend, prompt_extend_method=args.prompt_extend_method,
        prompt_extend_model=args.prompt_extend_model, prompt_extend_target_lang=args.prompt_extend_target_lang,
        prompt_extend_fallback=args.prompt_extend_fallback, prompt_extend_timeout=args.prompt_extend_timeout,
        resume=path(getattr(args, "resume", None)), overwrite=args.overwrite, ulysses_size=args.ulysses_size,
        dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp,
        **{flag: Path(getattr(args, flag)) for flag in COMPONENT_FLAGS if getattr(args, flag) is not None})


def cmd_generate(args) -> int:
    from wanlite.errors import WanliteError
    from wanlite.pipelines.pipeline import Pipeline, display, generate

    from wanlite.parallel import is_leader

    queued = args.prompt_file is not None or args.num_videos != 1
    request = request_from_args(args, args.explicit, needs_prompt=args.prompt_file is None)
    leader = is_leader()  # under torchrun, rank 0 shows progress and results
    if not queued:
        with display(leader) as progress:
            result = generate(request, progress=progress)
        if leader:
            _print_result(result)
        return 0
    from wanlite.pipelines.queue import Item, read_queue, run_queue, with_seeds

    if request.save_file is not None:
        raise WanliteError("--save_file names one video; a queue writes one mp4 per item into --output_dir")
    if request.resume is not None:
        raise WanliteError("--resume continues one video; drop --prompt_file / --num_videos")
    items = read_queue(args.prompt_file) if args.prompt_file is not None else [Item("--prompt")]
    items = with_seeds(items, args.num_videos, request.seed)
    def report(n: int, outcome) -> None:
        if not leader:
            return
        status = f"wrote {outcome.path}" if outcome.error is None else f"error: {outcome.error}"
        print(f"[{n}/{len(items)}] {outcome.item.label}: {status}", flush=True)

    with Pipeline(request, progress=leader) as pipe:
        outcomes = run_queue(pipe, items, report)
    if leader:
        _print_queue(outcomes, pipe.loads)
    return max((o.exit_code for o in outcomes), default=0)


def _print_result(result) -> None:
    extend = result.job.prompt_extend
    if extend is not None and extend.original_prompt is not None:
        print(f"prompt: {extend.original_prompt}")
        print(f"extended prompt ({extend.method} {extend.model}): " + (
            result.settings.prompt if extend.error is None else f"none ({extend.error}); the prompt was used as given"))
    print(f"wrote {result.path}" + (f" and {result.preview}" if result.preview else ""))
    print(_telemetry_line(result.telemetry.to_dict()))
    if result.cache is not None:
        print(_cache_line(result.cache))


def _print_queue(outcomes, loads) -> None:
    from rich.console import Console
    from rich.table import Table

    failed = [o for o in outcomes if o.error is not None]
    table = Table(title=f"{len(outcomes) - len(failed)} of {len(outcomes)} videos made "
                        f"(models loaded: {', '.join(f'{k} x{v}' for k, v in sorted(loads.items())) or 'none'})")
    for col in ("item", "prompt", "seed", "result", "time"):
        table.add_column(col)
    for o in outcomes:
        prompt = o.prompt if len(o.prompt) <= 40 else o.prompt[:39] + "…"
        table.add_row(o.item.label, prompt, "" if o.seed is None else str(o.seed),
                      str(o.path) if o.error is None else f"error: {o.error}", f"{o.seconds:.1f} s")
    Console(width=160).print(table)


def _cache_line(c: dict) -> str:
    line = (f"cache ({c['policy']}): {c['skipped_fraction']:.0%} of block evaluations skipped "
            f"({c['block_evals_saved_x']:.2f}x fewer), {c['bytes_not_moved_gb']:.2f} GB of weights not moved")
    return line + (f"; calibration written to {c['calibration']}" if "calibration" in c else "")


def cmd_plan(args) -> int:
    from pathlib import Path

    from wanlite.errors import WanliteError
    from wanlite.pipelines.resolve import resolve
    from wanlite.planner import hypothetical, load_profile

    request = request_from_args(args, args.explicit, needs_prompt=False)
    if request.task.startswith("tiny-") and request.ckpt_dir is None:
        raise WanliteError(f"{request.task} is the bundled tiny model: it needs no plan (it fits anywhere)")
    choices = {} if args.profile == "auto" else load_profile(args.profile)[0]
    machine = None  # this machine, measured, as `generate` sees it
    if args.gpu is not None or args.vram is not None or args.ram is not None:
        machine = hypothetical(args.vram, args.ram if args.ram is not None else 32, args.disk, args.gpu)
    elif "gpu" in choices or "vram_gb" in choices or "ram_gb" in choices:
        machine = hypothetical(choices.get("vram_gb"), choices.get("ram_gb", 32), choices.get("disk_gbps", 2.0),
                               choices.get("gpu"))
    job = resolve(request, machine, without_files=request.ckpt_dir is None and not request.component_files())
    if args.save:
        out = Path(args.save)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(job.profile_toml(), encoding="utf-8")
        tmp.replace(out)
    if args.json:
        print(json.dumps({"job": job.to_dict()}, indent=2, ensure_ascii=False))
    else:
        _print_job(job)
    return 0


def _print_job(job) -> None:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    s, p, o = job.settings, job.predicted, job.offload
    gpus = "" if job.parallel is None else f" (figures per rank, {job.parallel.ranks} ranks)"
    table = Table(title=f"{s.task} {s.size[0]}*{s.size[1]}, {s.frames} frames, {s.steps} steps on "
                        f"{job.machine}{gpus}")
    for col in ("component", "format", "placement", "predicted"):
        table.add_column(col)
    placement = o.mode if o.mode != "block" else (
        f"block: {o.resident_blocks} resident, prefetch {o.prefetch}, host RAM {o.ram_mode}")
    chunks = f"; blocks in chunks of {job.chunk_tokens} tokens" if job.chunk_tokens else ""
    chunks += "; CFG per block" if job.cfg == "per_block" else ""
    show = lambda text: "" if p is None else text  # noqa: E731
    table.add_row("transformer", f"{job.weights.quant} ({job.dtype})", f"{job.device}, {placement}{chunks}",
                  show(f"weights {p and p.vram_weights_gb} GB + activations {p and p.vram_activations_gb} GB + "
                       f"buffers {p and p.vram_buffers_gb} GB"))
    table.add_row("text encoder", job.text_encoder.quant, job.text_encoder.device,
                  show(f"{p and p.vram_text_encoder_gb} GB VRAM" if job.text_encoder.device != "cpu" else "RAM"))
    x = job.prompt_extend
    if x is not None:  # a stage of its own, first: its memory is released before the text encoder loads
        where, need = x.model, "hosted: no memory here"
        if x.device:
            where = f"{x.device}, {x.model}"
            need = show(f"{p and p.vram_prompt_extender_gb} GB VRAM" if x.device != "cpu" else
                        f"{p and p.ram_prompt_extender_gb} GB RAM")
        table.add_row(f"prompt extender ({x.method})", x.quant or "", where, need)
    table.add_row("VAE", job.vae.dtype, f"{job.device}, " + ("whole frames" if job.vae.tile is None else
                                                             f"tiles of {job.vae.tile} latent px"),
                  show(f"{p and p.vram_vae_gb} GB"))
    if job.step_cache is not None:
        from wanlite.cache import describe

        table.add_row("step cache", describe(job.step_cache)["policy"], job.device,
                      show(f"{p and p.vram_cache_gb} GB state (in the activations); skipped blocks are neither run "
                           "nor moved"))
    for lora in job.loras:
        table.add_row(f"LoRA ({lora.role})", lora.mode, ", ".join(f"{Path(f).name}:{w:g}" for f, w in lora.files), "")
    if p is not None:
        from wanlite.pipelines.progress import clock

        table.add_row("total", "", "", f"peak VRAM {p.peak_vram_gb} GB, peak RAM {p.peak_ram_gb} GB, "
                                       f"{p.bytes_moved_per_step_gb} GB moved/step, ~{p.s_per_step} s/step, "
                                       f"~{clock(p.total_s)} for the clip (loading and decode included)")
    console = Console()
    console.print(table)
    for reason in job.reasons:
        console.print(f"why: {reason}")
    for warning in job.warnings:
        console.print(f"note: {warning}")


def cmd_profile(args) -> int:
    import json

    from wanlite.planner import load_or_probe
    from wanlite.planner.probe import cache_file

    hw = load_or_probe(refresh=args.refresh)
    if args.json:
        print(json.dumps(hw.to_dict(), indent=2))
        return 0
    gb = 1e9
    print(hw.describe())
    if hw.gpu is not None:
        print(f"  compute capability {hw.compute_capability}, free VRAM {hw.vram_free / gb:.1f} GB, "
              f"fp8 matmul {'yes' if hw.fp8_matmul else 'no'}, flash attention {'yes' if hw.flash_attention else 'no'}")
        print(f"  host->device {hw.h2d_pinned / gb:.1f} GB/s pinned, {hw.h2d_pageable / gb:.1f} GB/s pageable; "
              f"pinnable {hw.pin_limit / gb:.0f} GB")
    print(f"  RAM {hw.ram_total / gb:.1f} GB ({hw.ram_available / gb:.1f} free), disk read {hw.disk_read / gb:.1f} GB/s, "
          f"bf16 matmul {hw.bf16_flops / 1e12:.2f} TFLOP/s")
    for note in hw.notes:
        print(f"  note: {note}")
    print(f"  cached in {cache_file()} (re-measure with --refresh)")
    return 0


def _telemetry_line(t: dict) -> str:
    line = (f"memory: {t['bytes_moved_gb']:.2f} GB of weights moved to the device, "
            f"{t['copy_wait_s']:.2f} s waiting on transfers, {t['read_wait_s']:.2f} s on disk reads, "
            f"peak RSS {t['peak_rss_gb']:.2f} GB")
    return line + (f", peak VRAM {t['peak_device_gb']:.2f} GB" if t["peak_device_gb"] else "")


def cmd_convert(args) -> int:
    from pathlib import Path

    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from wanlite.errors import WanliteError
    from wanlite.pipelines.convert import TARGETS, convert

    if args.to not in TARGETS:  # before the progress bar draws anything
        raise WanliteError(f"--to {args.to!r} is unknown; choose one of {', '.join(TARGETS)}")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        job = bar.add_task(f"{args.task} -> {args.to}", total=None)

        def progress(done: int, total: int, role: str) -> None:
            bar.update(job, completed=done, total=total, description=f"{args.task} {role} -> {args.to}")

        locate_checkpoint(args)
        results = convert(Path(args.ckpt_dir), args.task, args.to, Path(args.out), progress)
    for r in results:
        print(f"wrote {r.path} ({r.output_bytes / 1e6:,.1f} MB from {r.source_bytes / 1e6:,.1f} MB)")
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from wanlite.pipelines.pipeline import display, generate
    from wanlite.pipelines.request import Request, parse_size
    from wanlite.pipelines.video_io import unique_path
    from wanlite.tiny import checkpoint_dir

    out = Path(args.save_file) if args.save_file else unique_path(Path(args.output_dir), "demo")
    request = Request(task=args.task, prompt=args.prompt, ckpt_dir=checkpoint_dir(args.task),
                      image=None if args.image is None else Path(args.image), seed=args.seed, device=args.device,
                      dtype="fp32", size=None if args.size is None else parse_size(args.size),
                      frames=args.frames, steps=args.steps, save_file=out, preview=True, overwrite=args.overwrite)
    with display(True) as progress:
        result = generate(request, progress=progress)
    s = result.settings
    print(f"wrote {result.path} and {result.preview}")
    print(f"{s.task}: \"{s.prompt}\" seed {s.seed}, {s.size[0]}x{s.size[1]}, {s.frames} frames at {s.fps} fps, "
          f"{s.steps} {s.solver} steps, shift {s.shift}, guidance {s.guide_scale[0]:g}")
    return 0


def job_flags(parser, for_plan: bool) -> None:
    """Every flag that shapes a job, shared by `generate` and `plan` (official generate.py names kept)."""
    from wanlite.cache import POLICY_NAMES, PRESETS
    from wanlite.quant import QUANT_CHOICES
    from wanlite.specs import TASKS

    parser.add_argument("--task", default=None, help=f"{', '.join(t for t in TASKS if not t.startswith('tiny-'))} "
                        f"({', '.join(t for t in TASKS if t.startswith('tiny-'))}: the bundled models)")
    parser.add_argument("--replay", default=None, metavar="FILE.mp4",
                        help="the settings and choices a wanlite video records (same weights, same machine: the same "
                             "frames); flags given with it override them")
    parser.add_argument("--ckpt_dir", default=None, help="checkpoint folder (official, diffusers, ComfyUI or GGUF "
                        "files), a ComfyUI models/ folder, or a Hugging Face repo id in the local cache; optional when "
                        "every component is given as a file")
    parser.add_argument("--prompt", default=None, help="what the video shows")
    parser.add_argument("--quant", default="auto", help=f"weights: auto (as the files store them), "
                        f"{', '.join(QUANT_CHOICES[1:])}; quantized while loading")
    parser.add_argument("--quant_backend", "--quant-backend", dest="quant_backend", default="torchao",
                        help="int8 only: torchao (default), bnb or quanto")
    dit_files = "safetensors (bf16/fp16/fp32/fp8-scaled), GGUF or .pth"
    for flag, what in (("high_noise_model", f"the high-noise expert (A14B tasks): {dit_files}"),
                       ("low_noise_model", f"the low-noise expert (A14B tasks): {dit_files}"),
                       ("dit", f"the transformer of a single-model task (ti2v-5B): {dit_files}"),
                       ("t5", "the umT5 text encoder: safetensors (bf16/fp16/fp32/fp8-scaled) or .pth (GGUF text "
                              "encoders are not read yet)"),
                       ("vae", "the VAE: safetensors or .pth")):
        parser.add_argument(f"--{flag}", default=None, metavar="FILE", help=f"{what}; overrides --ckpt_dir")
    parser.add_argument("--negative_prompt", default=None, help="default: the official negative prompt")
    parser.add_argument("--image", default=None,
                        help="input image (i2v-A14B: required; ti2v-5B: optional; s2v-14B: the reference face/person)")
    parser.add_argument("--size", default=None,
                        help="WIDTH*HEIGHT, e.g. 1280*720 (default: the task's); s2v-14B: the area to fit, the "
                          "reference image sets the aspect")
    parser.add_argument("--frames", "--frame_num", dest="frame_num", type=int, default=None,
                        help="frames, 4k+1 (default: the task's)")
    parser.add_argument("--infer_frames", dest="frame_num", type=int, default=None,
                        help="s2v-14B: frames per clip, a multiple of 4 (default 80)")
    parser.add_argument("--audio", default=None, metavar="FILE",
                        help="s2v-14B: the speech or song (any file with an audio track); muxed into the mp4")
    parser.add_argument("--pose_video", default=None, metavar="FILE", help="s2v-14B: a pose (DWPose) video to follow")
    parser.add_argument("--num_clip", type=int, default=None, metavar="N",
                        help="s2v-14B: at most N clips (default: as many as the audio lasts)")
    parser.add_argument("--start_from_ref", action="store_true",
                        help="s2v-14B: start the motion history from the reference image")
    parser.add_argument("--src_root_path", default=None, metavar="DIR",
                        help="animate-14B: the preprocessed folder (src_pose.mp4, src_face.mp4, src_ref.png; "
                          "src_bg.mp4 and src_mask.mp4 with --replace)")
    parser.add_argument("--replace", "--replace_flag", dest="replace", action="store_true",
                        help="animate-14B: replace the person in the video with the character (default: animate it)")
    parser.add_argument("--use_relighting_lora", action="store_true",
                        help="animate-14B: apply the checkpoint's relighting_lora.ckpt (recommended with --replace)")
    parser.add_argument("--refert_num", type=int, default=1,
                        help="animate-14B: frames each segment overlaps the previous one, 1 or 5 (default 1)")
    parser.add_argument("--wav2vec", default=None, metavar="DIR",
                        help="s2v-14B: the wav2vec2-large-xlsr-53-english folder (default: inside --ckpt_dir)")
    parser.add_argument("--solver", "--sample_solver", dest="sample_solver", default=None,
                        choices=["unipc", "dpm++", "euler"])
    parser.add_argument("--steps", "--sample_steps", dest="sample_steps", type=int, default=None)
    parser.add_argument("--shift", "--sample_shift", dest="sample_shift", type=float, default=None)
    parser.add_argument("--guide_scale", "--sample_guide_scale", dest="sample_guide_scale", default=None,
                        help="one value, or LOW,HIGH for the two A14B experts")
    parser.add_argument("--seed", "--base_seed", dest="base_seed", type=int, default=-1,
                        help="-1 picks a random seed (stored in the mp4)")
    parser.add_argument("--vae_tile", "--vae-tile", dest="vae_tile", type=int, default=None, metavar="N",
                        help="VAE decode in spatial tiles of N latent pixels (0: one piece; default: 256-pixel tiles "
                          "when the frame is larger)")
    parser.add_argument("--vae_dtype", default="fp32", choices=["fp32", "bf16"],
                        help="VAE decode precision: fp32 (official) or bf16 (half the memory, ~54-63 dB PSNR vs fp32)")
    parser.add_argument("--offload", default="auto", choices=["auto", "none", "model", "block"],
                        help="transformer placement: none (all on the device), model (one expert at a time), block "
                          "(stream blocks; for cards the expert does not fit); auto decides")
    parser.add_argument("--profile", default="auto",
                        help="auto (measure this machine and plan), a preset (8gb, 12gb, 16gb, 24gb, colab-t4, kaggle-t4, notebook, cpu) "
                          "or a .toml file; the flags below override its choices")
    parser.add_argument("--resident_blocks", type=int, default=None, metavar="K",
                        help="block offload: blocks kept on the device (default: the plan's)")
    parser.add_argument("--prefetch", type=int, default=None, metavar="D",
                        help="block offload: blocks copied ahead of the one computing (default: the plan's)")
    parser.add_argument("--chunk_tokens", type=int, default=None, metavar="N",
                        help="run each DiT block N tokens at a time (0: whole; default: the plan's)")
    parser.add_argument("--ram_mode", default=None, choices=["pinned", "mmap", "disk"],
                        help="block offload host memory: pinned (weights in RAM), mmap (read from the checkpoint "
                          "per block: for 16-32 GB PCs), disk (per-block cache files written once)")
    parser.add_argument("--offload_cache", default=None, metavar="DIR",
                        help="where --ram_mode disk writes its cache (default: the user cache folder)")
    parser.add_argument("--cache", default="auto",
                        choices=["auto", "off", *PRESETS, *POLICY_NAMES],
                        help="step caching: presets safe/fast/turbo (measured in docs/caching.md), or a policy for experts; "
                          "calibrate records the MagCache curve `--cache mag` needs (default: the profile's, "
                          "else off)")
    parser.add_argument("--cache_threshold", type=float, default=None, metavar="X",
                        help="DBCache/MagCache threshold (default: the preset's)")
    parser.add_argument("--cache_fn", type=int, default=None, metavar="N", help="DBCache: front blocks always computed")
    parser.add_argument("--cache_bn", type=int, default=None, metavar="N", help="DBCache: back blocks always computed")
    parser.add_argument("--taylorseer_order", type=int, default=None, metavar="K",
                        help="forecast skipped residuals with a Taylor series of this order (0-3)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="apply a LoRA (repeatable); on A14B tasks to both experts")
    parser.add_argument("--lora_high", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="A14B: a LoRA for the high-noise expert only (Lightning's high_noise_model.safetensors)")
    parser.add_argument("--lora_low", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="A14B: a LoRA for the low-noise expert only")
    parser.add_argument("--lora_mode", default="auto", choices=["auto", "merge", "runtime"],
                        help="auto: merge into weights as they load (before quantizing), a runtime low-rank branch on "
                          "weights stored quantized; merge: also re-quantize stored fp8/GGUF; runtime: branch only")
    parser.add_argument("--preset", default=None, choices=["lightning", "lightning-3phase"],
                        help="lightning: the 4-step distillation recipe (Euler, shift 5, guide 1: no uncond pass); "
                          "lightning-3phase: 8 steps, the first with CFG and without the LoRA (against slow "
                          "motion); pair them with the Lightning / lightx2v LoRAs")
    parser.add_argument("--cache_force", action="store_true",
                        help="cache even schedules of 8 steps or fewer (distilled; off by default)")
    parser.add_argument("--save_file", default=None, help="output .mp4 path (default: a new name in --output_dir)")
    parser.add_argument("--overwrite", action="store_true", help="let --save_file replace an existing file")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default="outputs")
    parser.add_argument("--preview", action="store_true", help="also write a contact-sheet PNG beside the mp4")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="compute precision: auto = bf16, or fp16 on GPUs without bf16 (T4, RTX 20xx, GTX 10xx, "
                             "P100); a step whose output overflows stops with the precision to use")
    parser.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    parser.add_argument("--use_prompt_extend", action="store_true",
                        help="rewrite the prompt into a detailed one with a Qwen model first (both are printed and "
                             "recorded; --replay reuses the rewrite)")
    parser.add_argument("--prompt_extend_method", default="local_qwen", choices=["local_qwen", "dashscope"],
                        help="local_qwen: a Qwen2.5 (with --image: Qwen2.5-VL) model from a folder or the Hugging Face "
                             "cache, placed by the plan; dashscope: Alibaba Cloud's API (key in DASH_API_KEY, "
                             "endpoint in DASHSCOPE_BASE_URL)")
    parser.add_argument("--prompt_extend_model", default=None, metavar="MODEL",
                        help="a folder, a repo id in the cache or an official short name (Qwen2.5_3B/7B/14B, "
                             "QwenVL2.5_3B/7B); dashscope: the model name (default: Qwen2.5-14B-Instruct / "
                             "Qwen2.5-VL-7B-Instruct; dashscope qwen-plus / qwen-vl-max)")
    parser.add_argument("--prompt_extend_target_lang", default="zh", choices=["zh", "en"],
                        help="the language of the rewritten prompt (default zh, as the official)")
    parser.add_argument("--prompt_extend_fallback", action="store_true",
                        help="if the rewrite fails, warn and go on with the prompt as given (default: stop)")
    parser.add_argument("--prompt_extend_timeout", type=float, default=60.0, metavar="S",
                        help="dashscope: seconds to wait for the answer (default 60)")
    parser.add_argument("--cfg", default="auto", choices=["auto", "batched", "per_block"],
                        help="classifier-free guidance: batched (cond + uncond as one batch) or per_block (one after "
                             "the other through each block: half the activations, same weights traffic); auto: the "
                             "plan's")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block (minutes of compiling first; needs a C++ compiler "
                             "on the CPU, Triton on the GPU)")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash", "sage"],
                        help="attention kernel: auto = PyTorch SDPA (its own flash kernels where the GPU has them); "
                             "flash (flash-attn) and sage (SageAttention) when installed, on a CUDA GPU")
    parser.add_argument("--ulysses_size", "--gpus", dest="ulysses_size", type=int, default=1, metavar="N",
                        help="split the work over N GPUs (launch with torchrun --nproc_per_node N -m wanlite "
                             "generate ...; T2V / I2V / TI2V); with plan: plan each of N GPUs")
    parser.add_argument("--dit_fsdp", action="store_true",
                        help="with --ulysses_size: shard the transformer's 16-bit weights over the GPUs (FSDP2)")
    parser.add_argument("--t5_fsdp", action="store_true",
                        help="with --ulysses_size: shard the text encoder's weights over the GPUs (FSDP2)")
    # Official flags accepted for muscle memory; wanlite's own memory handling decides what they mean.
    parser.add_argument("--offload_model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--convert_model_dtype", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    from wanlite import __version__
    from wanlite.archs import ARCHS
    from wanlite.loading import hub
    from wanlite.loading.checkpoints import COMPONENT_FLAGS
    from wanlite.pipelines.convert import TARGETS
    from wanlite.specs import TASKS

    parser = argparse.ArgumentParser(prog="wanlite", description="Wan2.2 video generation on consumer GPUs.")
    parser.add_argument("--version", action="version", version=f"wanlite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="settings stored in a wanlite mp4, or sizes and manifest of an architecture")
    info.add_argument("file", nargs="?", help="an mp4 written by wanlite generate")
    info.add_argument("--arch", help=", ".join(ARCHS))
    info.add_argument("--json", action="store_true", help="print JSON including the full {key: shape} manifest")
    info.set_defaults(func=cmd_info)
    gen = sub.add_parser("generate", help="generate a video (official generate.py flags are accepted)")
    job_flags(gen, for_plan=False)
    gen.add_argument("--prompt_file", default=None, metavar="FILE",
                     help="a queue: one prompt per line, or JSONL with per-item options ({\"prompt\": ..., "
                          "\"seed\": 3, \"size\": \"832*480\"}); models load once, each item writes its mp4")
    gen.add_argument("--num_videos", type=int, default=1, metavar="N",
                     help="N videos of each prompt, seeds SEED, SEED+1, ... (random ones with the default -1)")
    gen.add_argument("--resume", default=None, metavar="FILE",
                     help="continue a generation stopped by Ctrl-C, SIGTERM or running out of memory from its "
                          "resume file (OUTPUT.mp4.resume.pt; the same command finds it beside --save_file)")
    gen.set_defaults(func=cmd_generate)
    demo = sub.add_parser("demo", help="generate a clip with the bundled tiny model (no download, CPU is fine)")
    demo.add_argument("--prompt", default="a red square moving right on a black background")
    demo.add_argument("--task", default="tiny-t2v", choices=[t for t in TASKS if t.startswith("tiny-")])
    demo.add_argument("--image", default=None, help="first frame for tiny-ti2v (image-to-video)")
    demo.add_argument("--seed", "--base_seed", dest="seed", type=int, default=0)
    demo.add_argument("--size", default=None, help="WIDTH*HEIGHT (default: the model's)")
    demo.add_argument("--frames", "--frame_num", dest="frames", type=int, default=None)
    demo.add_argument("--steps", "--sample_steps", dest="steps", type=int, default=None)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--save_file", default=None, help="output .mp4 path (default: demo.mp4 in --output_dir)")
    demo.add_argument("--overwrite", action="store_true", help="let --save_file replace an existing file")
    demo.add_argument("--output_dir", "--output-dir", dest="output_dir", default=".",
                      help="demo.mp4 (or demo_N.mp4) and its PNG go here")
    demo.set_defaults(func=cmd_demo)
    plan = sub.add_parser("plan", help="resolve and explain how a generation would run on this (or a described) "
                          "machine: the same flags as generate; --ckpt_dir and the files are optional")
    job_flags(plan, for_plan=True)
    plan.add_argument("--gpu", default=None, metavar="NAME",
                      help='plan for this card: "RTX 3060", 2080 Ti, T4, P100, 4090, "RTX 4060 Laptop", ... '
                           "(wanlite.planner.gpus; --vram overrides its memory)")
    plan.add_argument("--vram", type=float, default=None, help="plan for a GPU with this many GB (0: no GPU)")
    plan.add_argument("--ram", type=float, default=None, help="plan for this many GB of RAM")
    plan.add_argument("--disk", type=float, default=2.0, help="disk read speed in GB/s for --vram/--ram")
    plan.add_argument("--save", default=None, metavar="FILE", help="write the job's choices as a profile (.toml) "
                      "that replays them (--profile FILE)")
    plan.add_argument("--json", action="store_true", help='print {"job": ...}, as the mp4 records it')
    plan.set_defaults(func=cmd_plan)
    prof = sub.add_parser("profile", help="measure this machine (cached; --refresh measures again)")
    prof.add_argument("--refresh", action="store_true")
    prof.add_argument("--json", action="store_true")
    prof.set_defaults(func=cmd_profile)
    conv = sub.add_parser("convert", help="quantize a task's transformer(s) once into fp8 / int8 / GGUF files")
    conv.add_argument("--ckpt_dir", required=True, help="checkpoint folder holding the task's transformer(s)")
    conv.add_argument("--task", required=True, choices=list(TASKS))
    conv.add_argument("--to", required=True, help=f"{', '.join(TARGETS)} (fp8: ComfyUI's scaled fp8)")
    conv.add_argument("--out", required=True, help="output folder (A14B: both experts), or a file for one model")
    conv.set_defaults(func=cmd_convert)
    check = sub.add_parser("check", help="find and verify a checkpoint folder for a task (headers and shapes only)")
    check.add_argument("--task", required=True, choices=list(TASKS))
    check.add_argument("--ckpt_dir", required=True, help="checkpoint folder (official, diffusers or ComfyUI files, "
                       "a ComfyUI models/ folder) or a Hugging Face repo id in the local cache")
    for flag in COMPONENT_FLAGS:
        check.add_argument(f"--{flag}", default=None, metavar="FILE", help="this file for that component")
    check.set_defaults(func=cmd_check)
    down = sub.add_parser("download", help="fetch the files a task needs from Hugging Face (only those of one "
                          "format), then check them")
    down.add_argument("--task", required=True, choices=list(hub.OFFICIAL))
    down.add_argument("--format", default="auto", choices=hub.FORMATS, metavar="FORMAT",
                      help="auto (what the planner runs on this card, or the one --vram describes), official "
                           "(Wan-AI repos as released: A14B experts in fp32), diffusers, bf16 / fp8 (ComfyUI "
                           "single files), gguf-q8_0, gguf-q6_k, gguf-q5_k_m, gguf-q4_k_m, ... (community GGUFs)")
    down.add_argument("--gpu", default=None, metavar="NAME", help='--format auto: plan for this card (e.g. "RTX 3060", '
                      "T4; wanlite plan --gpu lists them when the name is unknown)")
    down.add_argument("--vram", type=float, default=None, help="--format auto: plan for a GPU with this many GB")
    down.add_argument("--ram", type=float, default=None, help="--format auto: plan for this many GB of RAM")
    down.add_argument("--lora", default=None, choices=sorted(hub.LORAS),
                      help="also the 4-step distillation LoRA pair (A14B tasks): lightning or lightx2v")
    down.add_argument("--to", default=None, metavar="DIR",
                      help="destination folder (default: the repo's name, plus the format)")
    down.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="list what would be fetched, offline (sizes estimated)")
    down.add_argument("--endpoint", default=None, metavar="URL",
                      help="the Hub's address (default: HF_ENDPOINT, else huggingface.co)")
    down.set_defaults(func=cmd_download)
    prep = sub.add_parser("animate-prep", help="make the animate-14B input folder from a driving video and a "
                          "character image (pose, face crops; masks for --replace)")
    prep.add_argument("--video", "--video_path", required=True, help="the driving video (one person)")
    prep.add_argument("--ref", "--refer_path", required=True, help="the character image")
    prep.add_argument("--out", "--save_path", required=True, help="folder for src_pose.mp4, src_face.mp4, "
                      "src_ref.png (and src_bg.mp4, src_mask.mp4 with --replace)")
    prep.add_argument("--ckpt_path", "--ckpt_dir", required=True,
                      help="Wan2.2-Animate-14B folder, or its process_checkpoint/ (det/, pose2d/, sam2/)")
    prep.add_argument("--replace", "--replace_flag", action="store_true",
                      help="replacement mode: also the background and the person's mask")
    prep.add_argument("--resolution_area", type=int, nargs=2, default=[1280, 720], metavar=("W", "H"),
                      help="frames are scaled to this many pixels, aspect kept (default 1280 720)")
    prep.add_argument("--fps", type=float, default=30, help="frame rate of the outputs; -1: the video's (default 30)")
    prep.add_argument("--retarget", "--retarget_flag", action="store_true",
                      help="animation mode: re-proportion the skeleton to the character (both should face the "
                      "camera, standing, in the first frame and the image)")
    prep.add_argument("--use_flux", action="store_true", help=argparse.SUPPRESS)
    prep.add_argument("--mask_source", default="sam2", choices=["sam2", "pose"],
                      help="--replace masks from SAM2 (official) or a box around the pose (no extra model)")
    prep.add_argument("--iterations", type=int, default=3, help="mask dilation passes (default 3)")
    prep.add_argument("--k", type=int, default=7, help="mask dilation kernel size (default 7)")
    prep.add_argument("--w_len", type=int, default=1, help="mask grid cells across its box (default 1: the box)")
    prep.add_argument("--h_len", type=int, default=1, help="mask grid cells down its box (default 1)")
    prep.add_argument("--device", default="auto", help="device for SAM2 (auto, cuda, cpu)")
    prep.set_defaults(func=cmd_animate_prep)
    return parser


def typed_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags actually typed (not defaulted): what overrides a --replay."""
    quiet = copy.deepcopy(parser)
    for sub in quiet._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv))) - {"func", "command"}


def resume_command(argv: list[str], file) -> str:
    """The command line that resumes `argv` (a generate command) from `file`."""
    import shlex

    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume="):
            skip = False
            continue
        skip = arg == "--resume"
        if not skip:
            kept.append(arg)
    return shlex.join(["wanlite", *kept, "--resume", str(file)])


def main(argv: list[str] | None = None) -> int:
    from wanlite.errors import Interrupted, WanliteError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = typed_flags(parser, argv)
    try:
        return args.func(args)
    except WanliteError as exc:
        print(f"wanlite: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:  # Ctrl-C / SIGTERM during a generation: one line, 130 / 143
        if exc.resume_file is None:
            print(f"wanlite: interrupted {exc.where or ''}".rstrip(), file=sys.stderr)
        else:
            command = resume_command(sys.argv[1:] if argv is None else argv, exc.resume_file)
            print(f"wanlite: interrupted {exc.where}; resume with: {command}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("wanlite: interrupted", file=sys.stderr)
        return 130
    finally:
        from wanlite.parallel import leave

        leave()  # torchrun's ranks part without a warning


if __name__ == "__main__":
    sys.exit(main())
