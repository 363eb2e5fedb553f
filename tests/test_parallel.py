"""Several GPUs (wanlite.parallel), shown on the CPU with the gloo backend: 2 ranks give the frames one process
gives, through the Python API and through torchrun; bad setups stop every rank with one line; a rank whose peer
dies stops instead of waiting."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wanlite.cli import main
from wanlite.eval import psnr
from wanlite.loading.checkpoints import discover
from wanlite.loading.models import expert_components, load_dit
from wanlite.testing.fixtures import write_fixture
from wanlite.testing.lora_files import random_pairs, write_lora
from wanlite.testing.ranks import run_ranks

STEPS = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    image = root / "in.png"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[10:40, 20:50] = (200, 60, 30)
    Image.fromarray(rgb).save(image)
    ckpts = {task: write_fixture(task, "official", root / task) for task in ("t2v-A14B", "i2v-A14B", "ti2v-5B")}
    high = expert_components(discover(ckpts["t2v-A14B"]), "t2v-A14B")["high_noise"]
    lora = write_lora(root / "lora.safetensors", random_pairs(load_dit(high, "t2v-A14B", torch.float32), rank=4, seed=1))
    return {"root": root, "image": image, "ckpts": ckpts, "lora": lora}


def _generate(options: dict):
    """One generation (a rank's, under run_ranks); returns its frames, the step cache's figures and the job."""
    from wanlite import generate

    result = generate(progress=False, **options)
    return result.frames, result.cache, result.job.to_dict()


def _forwards():
    """Each DiT variant's forward on this rank's tokens: whole, in token chunks, and per-block CFG."""
    from wanlite import parallel
    from wanlite.models.dit import WanDiT
    from wanlite.specs import TINY_DIT_SPECS

    world = parallel.join(parallel.launched_ranks(), "cpu")
    outs = []
    for task, hw in (("t2v-A14B", (4, 8)), ("i2v-A14B", (4, 8)), ("ti2v-5B", (8, 8))):
        torch.manual_seed(0)
        spec = TINY_DIT_SPECS[task]
        model = WanDiT(spec).eval()
        model.sequence_parallel = None if world is None else parallel.SequenceParallel(world)
        x = torch.randn(2, spec.out_dim, 5, *hw)
        y = torch.randn(2, spec.in_dim - spec.out_dim, 5, *hw) if spec.in_dim > spec.out_dim else None
        # TI2V: one timestep per latent frame (frame 0 clean), so a rank's tokens straddle modulation rows
        t = torch.tensor([[0.0, 700, 700, 700, 700]] * 2) if task == "ti2v-5B" else torch.tensor([700.0, 700.0])
        context = [torch.randn(7, spec.text_dim), torch.randn(3, spec.text_dim)]
        for chunk, rows_apart in ((None, False), (8, False), (None, True), (6, True)):
            model.chunk_tokens, model.rows_apart = chunk, rows_apart
            with torch.no_grad():
                outs.append(model(x, t, context, y=y))
    return outs


def _rank_work(generations: list[dict]):
    """What each rank of the main test runs (one pair of processes for all of it: spawning costs seconds)."""
    return _forwards(), [_generate(options) for options in generations]


# (task, options): both experts across the switch with fp8 weights, a LoRA on the high-noise one and a step cache
# whose decision must match on both ranks; the image-conditioned pair with int8, token chunks, CFG per block and
# block offload
GENERATIONS = [
    ("t2v-A14B", {"quant": "fp8", "cache": "dbcache", "cache_threshold": 0.3, "cache_force": True,
                  "offload": "model", "lora_high": "LORA"}),
    ("i2v-A14B", {"quant": "int8", "chunk_tokens": 8, "cfg": "per_block", "offload": "block", "ram_mode": "pinned",
                  "image": "IMAGE"}),
]


def test_two_ranks_give_the_frames_of_one(files, tmp_path):
    generations = [{"task": task, "ckpt_dir": str(files["ckpts"][task]), "prompt": "a red square", "size": "64*32",
                    "frames": 9, "steps": STEPS, "seed": 3, "save_file": str(tmp_path / f"{task}-one.mp4"),
                    **{k: str(files["image"]) if v == "IMAGE" else str(files["lora"]) if v == "LORA" else v
                       for k, v in options.items()}}
                   for task, options in GENERATIONS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: a GEMM's rounding may depend on its thread count
    try:
        forwards, alone = _forwards(), [_generate(options) for options in generations]
    finally:
        torch.set_num_threads(threads)
    on_two = [{**options, "ulysses_size": 2, "save_file": options["save_file"].replace("-one", "-two")}
              for options in generations]
    for rank, outcome in enumerate(run_ranks(2, _rank_work, on_two, folder=tmp_path / "ranks", timeout_s=600)):
        assert outcome[0] == "ok", outcome
        their_forwards, their_generations = outcome[1]
        for i, (a, b) in enumerate(zip(their_forwards, forwards)):
            whole = i % 2 == 0  # unchunked: the same arithmetic on every token; chunked: attention's split differs
            err = float((a - b).abs().max())
            assert (err == 0.0) if whole else err < 1e-5, (rank, i, err)
        for (frames, cache, _), (theirs, their_cache, their_job) in zip(alone, their_generations):
            assert their_job["parallel"] == {"ranks": 2, "dit_fsdp": False, "t5_fsdp": False}
            assert np.array_equal(theirs, frames) or psnr(theirs, frames) >= 45.0, (rank, psnr(theirs, frames))
            if cache is not None:  # the same blocks skipped at the same steps on every rank as in one process
                assert their_cache["block_evals"] == cache["block_evals"] < cache["block_evals_total"], their_cache
    # rank 0 wrote each video; the other rank wrote nothing
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == sorted(
        f"{task}-{n}.mp4" for task, _ in GENERATIONS for n in ("one", "two"))


def test_torchrun_with_sharded_weights(files, tmp_path):
    """`torchrun --nproc_per_node 2 -m wanlite generate ... --ulysses_size 2 --dit_fsdp --t5_fsdp` (TI2V from an
    image: per-frame timesteps) writes the video of one process, once, and records the plan."""
    from wanlite.pipelines.video_io import read_mp4, read_mp4_metadata

    args = ["generate", "--task", "ti2v-5B", "--ckpt_dir", str(files["ckpts"]["ti2v-5B"]), "--size", "64*64",
            "--frame_num", "9", "--sample_steps", str(STEPS), "--prompt", "a red square", "--base_seed", "2",
            "--image", str(files["image"])]
    assert main([*args, "--save_file", str(tmp_path / "one.mp4")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANLITE_DIST_TIMEOUT": "120"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "wanlite", *args,
                           "--ulysses_size", "2", "--dit_fsdp", "--t5_fsdp", "--save_file", str(tmp_path / "two.mp4")],
                          capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 prints and writes
    one, two = read_mp4(tmp_path / "one.mp4")[0], read_mp4(tmp_path / "two.mp4")[0]
    assert np.array_equal(one, two) or psnr(one, two) >= 45.0
    assert read_mp4_metadata(tmp_path / "two.mp4")["job"]["parallel"] == {"ranks": 2, "dit_fsdp": True,
                                                                          "t5_fsdp": True}


def _port() -> int:
    from wanlite.testing.ranks import free_port

    return free_port()


def _refused(options: dict):
    from wanlite import generate
    from wanlite.errors import WanliteError

    try:
        generate(progress=False, **options)
    except WanliteError as exc:
        return str(exc)
    return None


def test_bad_setups_stop_every_rank_with_one_line(files, tmp_path, capsys):
    ckpt = str(files["ckpts"]["t2v-A14B"])
    plan = ["plan", "--task", "t2v-A14B", "--ckpt_dir", ckpt, "--size", "64*32", "--frame_num", "9"]
    # the tiny transformer has 2 heads: 3 GPUs cannot share them
    assert main([*plan, "--ulysses_size", "3"]) == 2
    assert "2 attention heads do not split over 3 GPUs" in capsys.readouterr().err
    assert main([*plan, "--frame_num", "5", "--size", "32*16", "--ulysses_size", "2"]) == 0  # 2*1*2 tokens: fine
    capsys.readouterr()
    for flags, message in ((["--ulysses_size", "2"], "launch with torchrun --nproc_per_node 2"),
                           (["--dit_fsdp"], "pass --ulysses_size N"),
                           (["--ulysses_size", "0"], "give the number of GPUs")):
        assert main(["generate", *plan[1:], "--prompt", "x", *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # under torchrun: a job rank 0 refuses (fsdp with quantized weights) is refused on every rank
    options = {"task": "t2v-A14B", "ckpt_dir": ckpt, "prompt": "x", "size": "64*32", "frames": 9, "steps": 2,
               "ulysses_size": 2, "dit_fsdp": True, "quant": "fp8", "save_file": str(tmp_path / "x.mp4")}
    outcomes = run_ranks(2, _refused, options, folder=tmp_path / "ranks", timeout_s=200)
    assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
    assert all(o[1] is not None and "--dit_fsdp shards 16-bit weights" in o[1] for o in outcomes), outcomes
    assert not (tmp_path / "x.mp4").exists()


def _lose_a_peer():
    from wanlite import parallel

    world = parallel.join(2, "cpu")
    if world.rank == 1:
        os._exit(3)  # a rank that dies (killed, crashed) mid-run
    parallel.SequenceParallel(world).gather(torch.ones(1, 4, 2))
    return "no error"


def test_a_rank_that_loses_its_peer_stops(tmp_path):
    outcomes = run_ranks(2, _lose_a_peer, folder=tmp_path, timeout_s=120, env={"WANLITE_DIST_TIMEOUT": "20"})
    assert outcomes[0][0] == "error" and outcomes[0][1].startswith("PeerLost: rank 0 lost the other ranks"), outcomes
    assert outcomes[1][0] == "hang"  # it exited without a result, as a killed rank does


def test_plan_for_two_t4s(capsys):
    """`wanlite plan --gpus 2 --gpu T4`: each card runs half the tokens (less activation memory, less time per
    step); with --dit_fsdp each holds half of an expert."""
    base = ["plan", "--task", "t2v-A14B", "--size", "832*480", "--gpu", "T4", "--ram", "29", "--json"]

    def predicted(*flags):
        assert main([*base, *flags]) == 0
        return json.loads(capsys.readouterr().out)["job"]

    one, two = predicted(), predicted("--gpus", "2")
    assert two["parallel"] == {"ranks": 2, "dit_fsdp": False, "t5_fsdp": False}
    p1, p2 = one["predicted"], two["predicted"]
    assert p2["s_per_step"] < p1["s_per_step"]
    assert p2["vram_activations_gb"] < p1["vram_activations_gb"]
    # bf16 experts sharded over two 24 GB cards: each holds about half of the one running (28.6 GB whole)
    sharded = predicted("--gpus", "2", "--dit_fsdp", "--gpu", "RTX 3090", "--ram", "128")
    assert sharded["weights"]["quant"] == "none" and sharded["predicted"]["vram_weights_gb"] < 0.6 * 28.6
