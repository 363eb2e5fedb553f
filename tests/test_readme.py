"""Every command README.md shows runs here, on the CPU, in seconds; docs/ examples are parsed.

Command lines are read from README.md's fenced code blocks (``\\`` continuations joined, ``#`` comments dropped).

Run for real (in-process, `wanlite.cli.main`):
- `wanlite demo ...`: as written plus `--steps 2 --frames 5 --output_dir TMP` (fewer steps and frames, same code);
- `wanlite download ...`: as written plus `--dry-run` (offline; no bytes are fetched). Its listing gives the
  destination folder and the LoRA files, and every `--ckpt_dir` / `--lora_*` path a README `generate` line uses
  must be one of them, so the quick start's step 2 names what step 1 writes;
- `wanlite plan ...`: as written (`--vram` / `--gpu` describe the card; nothing is loaded);
- `wanlite generate ...` with real weights: the tiny stand-ins substituted: `--task t2v-A14B` / `i2v-A14B` ->
  `tiny-t2v`, `ti2v-5B` -> `tiny-ti2v` (`wanlite.tiny.checkpoint_dir`), `--ckpt_dir` -> that bundled folder,
  `--lora_high` / `--lora_low` -> the bundled tiny LoRA, `--size` dropped (the tiny model's own), `--frames 5`,
  `--steps 2` unless a `--preset` sets the schedule, `--save_file` -> TMP; lines that are the same after the
  substitution run once. Every other flag (`--preset lightning`, `--prompt`, ...) is passed as written;
- `wanlite info FILE.mp4`: on the video the demo or the generate line above wrote under that name;
- `wanlite check --task T --ckpt_dir D`: with the same tiny substitution.

Parsed only, with the real parser (`wanlite.cli.build_parser()`, prefix matching off), so a renamed or removed
flag fails:
every `wanlite` line above before it runs, and every `wanlite` line in docs/*.md code blocks (`...` placeholders
dropped). Inline `wanlite COMMAND ...` spans (prose and tables, fragments too) must name a command and only
flags it has. `pip install` lines are checked for their shape (the CPU torch pin equals .ci/run's), `git clone` for the URL
the pip line installs from, `pytest` against .ci/run's test command. Also checked: README.md stays under 200 lines, every relative link in README.md and
docs/*.md names an existing file (and heading, for `#anchors`), and the table markers the bench scripts rewrite
are where the scripts look for them.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from wanlite.cli import build_parser, main
from wanlite.tiny import checkpoint_dir
from wanlite.tiny.lora import LORA_DIR

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
TINY = {"t2v-A14B": "tiny-t2v", "i2v-A14B": "tiny-t2v", "ti2v-5B": "tiny-ti2v"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def command_lines(path: Path) -> list[str]:
    """The command lines of a Markdown file's code blocks (no python blocks), continuations joined."""
    lines = []
    for block in FENCE.finditer(path.read_text(encoding="utf-8")):
        if block.group(0).startswith("```python"):
            continue
        text = re.sub(r"\\\n\s*", " ", block.group(1))
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def split(line: str) -> list[str]:
    """shlex words without a bare `...` placeholder (a quoted "..." stays: it is a value)."""
    return shlex.split(re.sub(r"(?<=\s)\.\.\.(?=\s|$)", " ", line), comments=True)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def replace_flag(argv: list[str], name: str, value: str | None) -> list[str]:
    """argv with `name VALUE` set to `value` (None: removed; added when absent)."""
    out = list(argv)
    if name in out:
        i = out.index(name)
        del out[i:i + 2]
    if value is not None:
        out += [name, value]
    return out


def test_every_readme_line_is_a_known_kind():
    kinds = ("wanlite ", "pip install ", "pytest", "git clone ", "torchrun --nproc_per_node ")
    odd = [line for line in command_lines(README) if not line.startswith(kinds)]
    assert not odd, f"README shows commands this test does not cover: {odd}"
    assert any(line.startswith("wanlite demo") for line in command_lines(README))


def test_pip_lines_have_the_install_shapes():
    ci = (REPO / ".ci" / "run").read_text()
    ci_torch = re.search(r'"torch==([\d.]+)"', ci).group(1)
    pips = [line for line in command_lines(README) if line.startswith("pip ")]
    assert pips
    for line in pips:
        argv = split(line)
        assert argv[:2] == ["pip", "install"], line
        spec = argv[2]
        if spec.startswith("torch"):
            index = flag(argv, "--index-url")
            assert index and index.startswith("https://download.pytorch.org/whl/"), line
            if index.endswith("/cpu"):
                assert spec == f"torch=={ci_torch}", f"{line}: CI installs torch=={ci_torch}"
        elif spec.startswith("wanlite @ "):
            assert re.fullmatch(r"wanlite @ git\+https://github\.com/[\w.-]+/[\w.-]+", spec), line
        else:
            assert spec in ('-e', 'wanlite[prep]'), line
            if spec == "-e":
                assert argv[3] == ".[test]" and 'pip install -q -e ".[test]"' in ci, line
    assert any(split(p)[2].startswith("wanlite @ git+") for p in pips), "the install from the repository URL"


def test_git_clone_line_clones_the_url_pip_installs():
    clones = [line for line in command_lines(README) if line.startswith("git ")]
    urls = {split(p)[2].removeprefix("wanlite @ git+") for p in command_lines(README) if p.startswith("pip ")
            and split(p)[2].startswith("wanlite @ ")}
    for line in clones:
        argv = split(line)
        assert argv[:2] == ["git", "clone"] and argv[2] in urls, line
        assert argv[3:] in ([], ["&&", "cd", argv[2].rsplit("/", 1)[1]]), line


def test_pytest_line_is_what_ci_runs():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == "pytest"
    assert "pytest" in command_lines(README)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_wanlite_line_parses(path):
    parser = strict_parser()
    lines = [line for line in command_lines(path) if line.startswith("wanlite ")]
    assert lines or path.name in ("README.md", "python-api.md", "benchmarks.md", "tiny-model.md", "commands.md")
    # torchrun lines run `-m wanlite ...` on each rank (tests/test_parallel.py runs one): the wanlite part parses
    ranks = [line for line in command_lines(path) if line.startswith("torchrun ")]
    for line in ranks:
        argv = split(line)
        assert argv[3:5] == ["-m", "wanlite"] and f"--ulysses_size {argv[2]}" in line, line
    for line in [*lines, *(shlex.join(["wanlite", *split(r)[5:]]) for r in ranks)]:
        argv = split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse's error: a renamed or removed flag, a bad choice
            pytest.fail(f"{path.name}: `{line}` does not parse ({exc})")


def inline_commands(path: Path) -> list[str]:
    """Every `wanlite COMMAND ...` code span outside code blocks (prose and tables, fragments included)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8")).replace("\n", " ")
    return re.findall(r"`(wanlite [a-z][a-z-]*[^`]*)`", text)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_inline_wanlite_flags_exist(path):
    """Inline spans are often fragments (`wanlite plan --cache fast`, `wanlite download --task TASK [--vram GB]`):
    each names a command, and each --flag in it must be one of that command's options, spelled out."""
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for span in inline_commands(path):
        name = span.split()[1]
        assert name in commands, f"{path.name}: `{span}` names no wanlite command"
        options = {o for a in commands[name]._actions for o in a.option_strings}
        unknown = [f for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", span) if f not in options]
        assert not unknown, f"{path.name}: `{span}`: wanlite {name} has no {unknown}"


def strict_parser():
    """The CLI's parser without prefix matching, so a flag renamed to a longer name fails instead of matching."""
    import argparse

    parser = build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return parser


def _slug(heading: str) -> str:  # GitHub's anchor for a heading
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_point_to_existing_files_and_headings():
    link = re.compile(r"\]\(([^)\s]+)\)")
    for page in [README, *DOCS]:
        for target in link.findall(page.read_text(encoding="utf-8")):
            if re.match(r"https?://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(REPO)}: link to {target} names no file"
            if anchor and dest.suffix == ".md":
                heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), re.M)}
                assert anchor in heads, f"{page.relative_to(REPO)}: {target} names no heading in {dest.name}"


def test_length_and_table_markers():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "the README is the first page: keep it under 200 lines"
    assert "<!-- plans table: begin (python bench/plans.py) -->" in text  # bench/plans.py rewrites it there
    assert "<!-- cache table: begin (python bench/cache.py --readme) -->" in (REPO / "docs" / "caching.md").read_text()


def _tiny(argv: list[str], tmp: Path, outputs: dict[str, Path]) -> list[str]:
    """A README generate/check line with the tiny stand-ins substituted (see the module docstring)."""
    task = flag(argv, "--task")
    tiny = TINY[task]
    out = replace_flag(argv, "--task", tiny)
    out = replace_flag(out, "--ckpt_dir", str(checkpoint_dir(tiny)))
    if argv[0] == "generate":
        for side in ("high", "low"):
            if f"--lora_{side}" in out:
                out = replace_flag(out, f"--lora_{side}", str(LORA_DIR / f"{side}_noise_model.safetensors"))
        out = replace_flag(out, "--size", None)
        out = replace_flag(out, "--frames", "5")
        if "--preset" not in out:
            out = replace_flag(out, "--steps", "2")
        name = flag(argv, "--save_file")
        assert name, f"`wanlite {' '.join(argv)}`: give --save_file so the README's `wanlite info` line names it"
        same = replace_flag(out, "--save_file", None)  # lines equal after the substitution share one file
        outputs[name] = tmp / f"{abs(hash(tuple(same))) % 10**8}-{Path(name).name}"
        out = replace_flag(out, "--save_file", str(outputs[name]))
    return out


def _downloads(text: str) -> tuple[str, list[str]]:
    """(destination folder, LoRA paths under it) from `wanlite download --dry-run`'s listing."""
    head, *rows = text.strip().splitlines()
    dest = re.search(r" into (\S+)$", head).group(1)
    loras = [f"{dest}/loras/{row.split()[-3]}" for row in rows if row.strip().startswith("LoRA (")]
    return dest, loras


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = [split(line)[1:] for line in command_lines(README) if line.startswith("wanlite ")]
    parser = strict_parser()
    for argv in lines:
        parser.parse_args(argv)

    done: dict[tuple, int] = {}
    outputs: dict[str, Path] = {}  # README file name -> the file the run wrote
    fetched: set[str] = set()  # folders and LoRA files the README's downloads write
    generates: list[list[str]] = []

    def run(argv: list[str]) -> str:
        key = tuple(argv)
        if key not in done:
            capsys.readouterr()
            done[key] = main(argv)
            text = capsys.readouterr().out
            assert done[key] == 0, f"`wanlite {shlex.join(argv)}` exited {done[key]}:\n{text[-2000:]}"
            return text
        return ""

    for argv in lines:
        command = argv[0]
        if command == "demo":
            run(argv + ["--steps", "2", "--frames", "5", "--output_dir", str(tmp_path)])
            outputs["demo.mp4"] = tmp_path / "demo.mp4"
        elif command == "download":
            text = run(argv if "--dry-run" in argv else argv + ["--dry-run"])
            if text:
                dest, loras = _downloads(text)
                fetched.update([dest, *loras])
        elif command == "plan":
            run(argv)
        elif command in ("generate", "check"):
            if command == "generate":
                generates.append(argv)
            tiny = _tiny(argv, tmp_path, outputs)
            run(tiny)
            if command == "generate":
                assert outputs[flag(argv, "--save_file")].is_file()
        elif command == "info":
            target = argv[1] if len(argv) > 1 and not argv[1].startswith("--") else None
            if target is None:
                run(argv)
            else:
                assert target in outputs, f"`wanlite {shlex.join(argv)}`: no README line above writes {target}"
                text = run(["info", str(outputs[target]), *argv[2:]])
                assert not text or "job.settings.task" in text
        else:
            pytest.fail(f"README shows `wanlite {command}`, which this test does not run yet; add it here")

    assert generates, "the quick start shows generate lines"
    for argv in generates:  # step 2 uses what step 1 fetched
        named = [flag(argv, "--ckpt_dir")] + [flag(argv, f) for f in ("--lora_high", "--lora_low") if f in argv]
        missing = [p for p in named if p not in fetched]
        assert not missing, f"`wanlite {shlex.join(argv)}` names {missing}, which no README download writes"
