"""Fuzz wanlite's checkpoint readers: seeded mutations of tiny valid safetensors, GGUF and .pth files (written by
wanlite's own writers and gguf-py), each opened and read the way `check` and `generate` do; and damaged copies of
the bundled tiny-t2v folder ("folder": one file mutated, then `check_checkpoint`, then every load `generate` does).

Every mutant must end in one of two ways: accepted (then every tensor reads back with its declared shape) or
refused with a `WanliteError` whose message is one line. Anything else is counted: a foreign exception (another
type, or a multi-line message), a hang (no progress for `--timeout` seconds: the worker is killed and restarted
after that case), a crash (the worker died). For safetensors, an accepted mutant that the reference `safetensors`
library refuses is counted as `accepted_reference_refuses` (silent acceptance of a structurally invalid file).
A folder that passes check and then fails to load counts as foreign (check and generate disagree).

Cases run in a spawned worker process that reports after each one, so a hang costs one case, not the run.
`python bench/fuzz.py --per-format 100000` writes bench/results/fuzz.json (counts per format and per mutation
kind, the first foreign / hang samples); the test suite runs a few thousand (tests/test_fuzz.py).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import random
import re
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

FORMATS = ("safetensors", "gguf", "pth", "folder")
SUFFIX = {"safetensors": ".safetensors", "gguf": ".gguf", "pth": ".pth"}
FOLDER_TASK = "tiny-t2v"
INTERESTING = (0, 1, 2, 7, 8, 31, 32, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
FOREIGN_SAMPLES = 5


# ---- seed files ----

def seed_files(folder: Path) -> dict[str, bytes]:
    """Tiny valid files of each format, written by wanlite's writers (and gguf-py for GGUF)."""
    import numpy as np
    import torch

    from wanlite.loading.writers import save_pth, save_safetensors
    from wanlite.testing.quant_files import write_gguf_with_gguf_py

    g = torch.Generator().manual_seed(0)
    state = {
        "patch_embedding.weight": torch.randn(8, 16, 1, 2, 2, generator=g),
        "blocks.0.self_attn.q.weight": torch.randn(64, 64, generator=g),
        "blocks.0.self_attn.norm_q.weight": torch.randn(64, generator=g),
        "head.modulation": torch.randn(1, 2, 8, generator=g),
    }
    folder.mkdir(parents=True, exist_ok=True)
    mixed = {**state, "blocks.0.ffn.0.weight": torch.randn(4, 8, generator=g).bfloat16(),
             "blocks.0.ffn.0.bias": torch.arange(4, dtype=torch.int64), "empty": torch.zeros(0, 3)}
    save_safetensors(mixed, folder / "seed.safetensors", {"format": "pt"})
    save_pth({k: v.clone() for k, v in mixed.items()}, folder / "seed.pth")
    big = {**state, "blocks.0.ffn.0.weight": torch.randn(16, 256, generator=g)}  # one Q8_0 tensor
    write_gguf_with_gguf_py(big, folder / "plain.gguf")
    # a GGUF with string / integer / nested arrays in its metadata, as LLM and ComfyUI files carry
    import gguf

    writer = gguf.GGUFWriter(str(folder / "seed.gguf"), "wan")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "def"])
    writer.add_array("comfy.gguf.orig_shape.blocks.0.self_attn.q.weight", [64, 64])
    writer.add_array("fuzz.nested", [[1, 2], [3]])
    writer.add_uint32("general.alignment", 32)
    for name, t in big.items():
        array = t.float().numpy()
        if name == "blocks.0.ffn.0.weight":
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float16 if array.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"safetensors": [(folder / "seed.safetensors").read_bytes()],
            "gguf": [(folder / "seed.gguf").read_bytes(), (folder / "plain.gguf").read_bytes()],
            "pth": [(folder / "seed.pth").read_bytes()]}


# ---- mutations ----

def _flip(data: bytearray, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256) if rng.random() < 0.5 else data[i] ^ (1 << rng.randrange(8))
    return "flip"


def _overwrite_int(data: bytearray, rng: random.Random, at: int | None = None, width: int | None = None) -> str:
    width = width or rng.choice((4, 8))
    at = rng.randrange(max(1, len(data) - width)) if at is None else at
    value = rng.choice(INTERESTING + (len(data), len(data) + 1, len(data) - at, rng.randrange(2**width * 8)))
    data[at:at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    return f"int{width * 8}@{at}"


def _generic(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    pick = rng.random()
    if pick < 0.35:
        label = _flip(out, rng)
        return bytes(out), label
    if pick < 0.55:
        cut = rng.randrange(len(data))
        return data[:cut], "truncate"
    if pick < 0.8:
        label = _overwrite_int(out, rng)
        return bytes(out), label
    if pick < 0.9:
        at, n = rng.randrange(len(data)), rng.randint(1, 64)
        return data[:at] + bytes(rng.randrange(256) for _ in range(n)) + data[at:], "insert"
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 64):], "delete"


def _json_value(rng: random.Random, size: int):
    return rng.choice([
        -1, 0, 2**63, 2**64 + 5, 10**30, int("9" * 40), size, size * 2, 1.5, True, None, "8", [], {},
        [1, 2], [[0]], [2**62, 2**62], [0, 10**18], [-5], [0] * 40, [1.0], "F32", "X9", ["F32"],
    ])


def _safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    pick = rng.random()
    if pick < 0.15:  # header length only
        value = rng.choice((0, 1, 2, n - 1, n + 1, n + 8, len(data), 0x80, 2**63, rng.randrange(2 * n)))
        return struct.pack("<Q", value % 2**64) + data[8:], "header_len"
    if pick < 0.3:  # raw text edits of the JSON: duplicates, nesting, long digits, other encodings
        text = data[8:8 + n].decode()
        edit = rng.choice(("dup", "nest", "digits", "utf16", "nan", "drop_brace"))
        if edit == "dup":
            first = re.search(r'"[^"]+": \{[^}]*\}', text) or re.search(r'"[^"]+":\{[^}]*\}', text)
            text = text[:-1] + ", " + first.group(0) + "}" if first else text
        elif edit == "nest":
            depth = rng.choice((50, 5000, 200000))
            text = text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
        elif edit == "digits":
            text = re.sub(r"\d+", "9" * rng.choice((25, 5000, 50000)), text, count=1)
        elif edit == "nan":
            text = re.sub(r"\d+", rng.choice(("NaN", "Infinity", "-1e400", "1e3")), text, count=1)
        elif edit == "drop_brace":
            text = text[1:]
        raw = text.encode("utf-16-le" if edit == "utf16" else "utf-8")
        return struct.pack("<Q", len(raw)) + raw + body, "json_" + edit
    # structured edits of one entry
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    field = rng.choice(("dtype", "shape", "data_offsets", "entry", "metadata", "rename", "pad"))
    if field == "entry":
        header[name] = _json_value(rng, len(body))
    elif field == "metadata":
        header["__metadata__"] = rng.choice(({"a": 1}, [1], "x", {"a": {"b": "c"}}, None, {}))
    elif field == "rename":  # huge block numbers in key names (the block count is read off them)
        header[rng.choice(("blocks.1000000000.x", "blocks.99.self_attn.q.weight", "encoder.block.10000000.x",
                           "blocks.-1.y", "blocks.00000000000000000000000007.z"))] = entry
    elif field == "pad":  # a valid file whose header length starts with 0x80 (or other odd lengths)
        text = json.dumps(header)
        pad = max(0, rng.choice((128, 128 + 256, 128 + 256 * 5)) - len(text))
        raw = (text + " " * pad).encode()
        return struct.pack("<Q", len(raw)) + raw + body, "pad"
    elif isinstance(entry, dict):
        if field == "shape" and rng.random() < 0.5 and isinstance(entry.get("shape"), list) and entry["shape"]:
            shape = list(entry["shape"])
            shape[rng.randrange(len(shape))] = rng.choice((0, -1, 2**31, 2**62, 2**64, 3, 10**25))
            entry["shape"] = shape
        else:
            entry[field] = _json_value(rng, len(body))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body, "json_" + field


def _gguf_fields(data: bytes) -> list[tuple[str, int]]:
    """(what, offset) of the header's integer fields, found by walking the seed (a valid file) in order."""
    fields = [("version", 4), ("n_tensors", 8), ("n_kv", 16)]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(vtype: int, pos: int) -> int:
        if vtype in sizes:
            return pos + sizes[vtype]
        if vtype == 8:
            fields.append(("string_len", pos))
            return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
        fields.append(("array_type", pos))
        itype, count = struct.unpack_from("<IQ", data, pos)
        fields.append(("array_count", pos + 4))
        pos += 12
        for _ in range(count):
            pos = value(itype, pos)
        return pos

    for _ in range(n_kv):
        fields.append(("key_len", pos))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        fields.append(("value_type", pos))
        pos = value(struct.unpack_from("<I", data, pos)[0], pos + 4)
    for _ in range(n_tensors):
        fields.append(("name_len", pos))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        fields.append(("n_dims", pos))
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields += [("dim", pos + 4 + 8 * i) for i in range(n_dims)]
        pos += 4 + 8 * n_dims
        fields += [("tensor_type", pos), ("tensor_offset", pos + 4)]
        pos += 12
    return fields


WIDTH = {"version": 4, "value_type": 4, "array_type": 4, "n_dims": 4, "tensor_type": 4}


def _gguf(data: bytes, rng: random.Random, fields: list[tuple[str, int]]) -> tuple[bytes, str]:
    out = bytearray(data)
    what, at = rng.choice(fields)
    width = WIDTH.get(what, 8)
    if width == 4 and what != "version" and rng.random() < 0.6:  # type flips: string <-> array, unknown codes
        value = rng.choice((8, 9, 4, 10, 13, 40, 41, 255, 2**31))
        out[at:at + 4] = struct.pack("<I", value % 2**32)
    elif what == "tensor_offset" and rng.random() < 0.5:  # misaligned or overlapping data
        (old,) = struct.unpack_from("<Q", data, at)
        out[at:at + 8] = struct.pack("<Q", max(0, old + rng.choice((-32, -1, 1, 16, 32, 4096))))
    else:
        _overwrite_int(out, rng, at, width)
    return bytes(out), "gguf_" + what


def _pth(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Mutate a member of the zip (the pickle, a storage, the byte-order record) and zip it again, so the
    mutation reaches torch's unpickler instead of stopping at a CRC check; or add / drop members."""
    src = zipfile.ZipFile(io.BytesIO(data))
    members = [(info, src.read(info)) for info in src.infolist()]
    pickles = [i for i, (info, _) in enumerate(members) if info.filename.endswith(".pkl")]
    i = rng.choice(pickles) if rng.random() < 0.6 else rng.randrange(len(members))
    info, raw = members[i]
    edit = rng.choice(("flip", "truncate", "int", "drop", "swap_protocol"))
    if edit == "drop":
        del members[i]
    else:
        buf = bytearray(raw)
        if edit == "flip" and buf:
            _flip(buf, rng)
        elif edit == "truncate":
            buf = buf[:rng.randrange(len(buf) + 1)]
        elif edit == "int" and len(buf) > 8:
            _overwrite_int(buf, rng)
        elif edit == "swap_protocol" and buf:
            buf[:2] = bytes((0x80, rng.choice((0, 1, 2, 5, 9))))
        members[i] = (info, bytes(buf))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info, raw in members:
            z.writestr(info.filename, raw)
    return out.getvalue(), "pth_" + edit


def mutant(fmt: str, seeds: list[bytes], fields: list, case: int, seed: int) -> tuple[bytes, str]:
    """Case `case` of format `fmt`: deterministic in (seed, fmt, case)."""
    rng = random.Random(f"{seed}/{fmt}/{case}")
    k = rng.randrange(len(seeds))
    data = seeds[k]
    if rng.random() < 0.35:
        return _generic(data, rng)
    try:
        if fmt == "safetensors":
            return _safetensors(data, rng)
        if fmt == "gguf":
            return _gguf(data, rng, fields[k])
        return _pth(data, rng)
    except (ValueError, struct.error, zipfile.BadZipFile):  # a structured edit that did not apply
        return _generic(data, rng)


def folder_files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder a mutation may hit (weights, shard indexes, configs, tokenizer)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def folder_mutant(files: list[Path], originals: dict[Path, bytes], case: int, seed: int) -> tuple[Path, bytes, str]:
    """One damaged file of the folder: (which file, its new bytes, label)."""
    rng = random.Random(f"{seed}/folder/{case}")
    path = rng.choice(files)
    data = originals[path]
    fmt = {".safetensors": "safetensors", ".pth": "pth"}.get(path.suffix)
    if fmt and rng.random() < 0.6:
        try:
            new, label = _safetensors(data, rng) if fmt == "safetensors" else _pth(data, rng)
            return path, new, f"{path.name}:{label}"
        except (ValueError, struct.error, zipfile.BadZipFile):
            pass
    new, label = _generic(data, rng)
    return path, new, f"{path.name}:{label}"


def check_then_load(folder: Path) -> str:
    """`wanlite check`'s validation, then everything `generate` reads; "refused" when check stops it, "accepted"
    when both pass. Raises when check passes and loading fails (they disagree) or on any foreign error."""
    from wanlite.errors import WanliteError
    from wanlite.loading.checkpoints import discover
    from wanlite.loading.models import check_checkpoint, load_dit, load_t5, load_vae
    from wanlite.models.t5 import load_tokenizer

    try:
        ckpt = discover(folder)
        check_checkpoint(ckpt, FOLDER_TASK)
    except WanliteError as exc:
        if "\n" in str(exc) or not str(exc):
            raise AssertionError(f"multi-line or empty message: {exc}") from None
        return "refused"
    try:
        for comp in ckpt.dits.values():
            load_dit(comp, FOLDER_TASK)
        load_t5(ckpt.t5)
        load_vae(ckpt.vae, FOLDER_TASK)
        load_tokenizer(ckpt.tokenizer)("a prompt to encode")
    except BaseException as exc:  # noqa: BLE001
        raise AssertionError(f"check passed but loading failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return "accepted"


# ---- one case ----

def read_all(path: Path) -> int:
    """Open `path` as `check` and `generate` do and read every tensor; returns the tensor count. Raises what
    wanlite raises."""
    import torch

    from wanlite.loading.checkpoints import _classify
    from wanlite.loading.stream import open_source

    _classify((path,), strict=True)  # discover's view: sniff and keys
    source = open_source([path])
    shapes = source.shapes()
    dtypes = source.dtypes()
    plan = [(k, torch.Size(s), dtypes[k] if dtypes[k].is_floating_point else dtypes[k]) for k, s in shapes.items()]
    got = 0
    reads = source.fill(plan)
    for key, tensor in reads:
        if tuple(tensor.shape) != tuple(shapes[key]):
            raise AssertionError(f"{key}: read shape {tuple(tensor.shape)}, declared {tuple(shapes[key])}")
        got += 1
    if got != len(plan):
        raise AssertionError(f"read {got} of {len(plan)} tensors")
    return got


def reference_refuses(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_slice(k)
    except Exception:
        return True
    return False


def classify(path: Path, fmt: str) -> tuple[str, str]:
    """(outcome, detail) of one case: accepted / refused / foreign."""
    from wanlite.errors import WanliteError

    try:
        read_all(path)
    except WanliteError as exc:
        text = str(exc)
        if "\n" in text or not text:
            return "foreign", f"{type(exc).__name__} with a {'multi-line' if text else 'empty'} message: {text[:300]}"
        return "refused", text
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 -- every other exception (a Rust panic too) is what this looks for
        return "foreign", "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300] + "\n" + \
            "".join(traceback.format_tb(exc.__traceback__)[-3:])[-900:]
    if fmt == "safetensors" and reference_refuses(path):
        return "accepted_reference_refuses", ""
    return "accepted", ""


def classify_folder(folder: Path) -> tuple[str, str]:
    try:
        return check_then_load(folder), ""
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001
        return "foreign", "".join(traceback.format_exception_only(type(exc), exc)).strip()[:600]


def _folder_worker(start: int, stop: int, seed: int, workdir: str, conn) -> None:
    import shutil

    from wanlite.tiny import checkpoint_dir

    folder = Path(workdir) / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)  # fresh: a killed worker may have left a damaged file behind
    shutil.copytree(checkpoint_dir(FOLDER_TASK), folder)
    files = folder_files(folder)
    originals = {p: p.read_bytes() for p in files}
    for case in range(start, stop):
        path, data, label = folder_mutant(files, originals, case, seed)
        conn.send(("start", case, label))
        path.write_bytes(data)
        try:
            outcome, detail = classify_folder(folder)
        finally:
            path.write_bytes(originals[path])
        conn.send(("done", case, outcome, detail if outcome == "foreign" else ""))
    conn.send(("end",))


def _worker(fmt: str, start: int, stop: int, seed: int, workdir: str, conn) -> None:
    import torch

    torch.set_num_threads(1)
    if fmt == "folder":
        return _folder_worker(start, stop, seed, workdir, conn)
    folder = Path(workdir)
    seeds = seed_files(folder / "seeds")[fmt]
    fields = [_gguf_fields(s) for s in seeds] if fmt == "gguf" else []
    path = folder / ("case" + SUFFIX[fmt])
    for case in range(start, stop):
        data, label = mutant(fmt, seeds, fields, case, seed)
        conn.send(("start", case, label))
        path.write_bytes(data)
        outcome, detail = classify(path, fmt)
        conn.send(("done", case, outcome, detail if outcome == "foreign" else detail[:0]))
    conn.send(("end",))


def run(fmt: str, cases: int, seed: int = 0, timeout: float = 10.0, first: int = 0, log=None) -> dict:
    """Run `cases` mutants of `fmt` in a spawned worker; a case that makes no progress for `timeout` seconds
    is a hang (the worker is killed and the run goes on after it)."""
    ctx = multiprocessing.get_context("spawn")
    counts = {"accepted": 0, "accepted_reference_refuses": 0, "refused": 0, "foreign": 0, "hang": 0, "crash": 0}
    samples: list[dict] = []
    labels: dict[str, dict[str, int]] = {}
    case, stop = first, first + cases
    with tempfile.TemporaryDirectory() as workdir:
        while case < stop:
            ours, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(fmt, case, stop, seed, workdir, theirs), daemon=True)
            proc.start()
            theirs.close()
            current, label, started = case, "", time.monotonic()
            while True:
                limit = timeout if current != case or label else timeout + 60  # the first case pays the imports
                if not ours.poll(limit):
                    proc.kill()
                    counts["hang"] += 1
                    if len(samples) < FOREIGN_SAMPLES * 2:
                        samples.append({"case": current, "mutation": label, "outcome": "hang"})
                    case = current + 1
                    break
                try:
                    msg = ours.recv()
                except EOFError:  # the worker died
                    proc.join()
                    if not label:
                        raise RuntimeError(f"the {fmt} fuzz worker died before its first case "
                                           f"(exit code {proc.exitcode})") from None
                    counts["crash"] += 1
                    samples.append({"case": current, "mutation": label, "outcome": f"crash {proc.exitcode}"})
                    case = current + 1
                    break
                if msg[0] == "end":
                    case = stop
                    break
                if msg[0] == "start":
                    current, label = msg[1], msg[2]
                    continue
                _, done, outcome, detail = msg
                counts[outcome] += 1
                kind = labels.setdefault(label.split("@")[0], {})
                kind[outcome] = kind.get(outcome, 0) + 1
                if outcome == "foreign" and len(samples) < FOREIGN_SAMPLES * 2:
                    samples.append({"case": done, "mutation": label, "outcome": outcome, "detail": detail})
                if log and (done + 1 - first) % (1000 if fmt != "folder" else 25) == 0:
                    log(f"{fmt}: {done + 1 - first}/{cases} in {time.monotonic() - started:.0f} s {counts}")
                case = done + 1
            proc.join(timeout=5)
            ours.close()
    return {"format": fmt, "cases": cases, "first_case": first, "seed": seed, "timeout_s": timeout,
            "counts": counts, "by_mutation": labels, "samples": samples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-format", type=int, default=100_000, help="cases per file format")
    parser.add_argument("--folder-cases", type=int, default=2_000,
                        help="damaged tiny-t2v folders (each runs check, then every load: about 1 s a case)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds without progress that count as a hang")
    parser.add_argument("--name", default="fuzz", help="result file name under bench/results/")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import write_json

    rows = []
    for fmt in args.formats:
        started = time.monotonic()
        cases = args.folder_cases if fmt == "folder" else args.per_format
        timeout = max(args.timeout, 60.0) if fmt == "folder" else args.timeout  # a load takes ~1 s, more when busy
        row = run(fmt, cases, args.seed, timeout, log=lambda m: print(m, flush=True))
        row["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps({k: row[k] for k in ("format", "cases", "counts", "seconds")}), flush=True)
        rows.append(row)
    write_json(args.name, {"per_format": args.per_format, "folder_cases": args.folder_cases,
                           "goal_per_format": 100_000, "rows": rows})
    bad = sum(r["counts"]["foreign"] + r["counts"]["hang"] + r["counts"]["crash"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
