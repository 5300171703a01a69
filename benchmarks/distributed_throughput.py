"""Clips per second of ``reconstruct`` on 1 and on N processes (torchrun), CPU or one GPU per process.

    python benchmarks/distributed_throughput.py                        # CPU: 1 and 2 processes, one thread each
    python benchmarks/distributed_throughput.py --device cuda --procs 1 2 4 8 --vae Wan2.1-I2V-14B-480P-Diffusers/vae
        --weights my-refdecoder --size 480x832 --frames 33 --clips 64  # a multi-GPU node

Each measurement is one ``torchrun --nproc-per-node N`` launch of this script in worker mode: every rank loads the
model, waits at a barrier, reconstructs its share of the clips through
:func:`refdecoder.inference.dataset_runs.reconstruct_dataset` (the code behind ``refdecoder reconstruct``: claims,
per-clip result files, metrics merged by rank 0) and waits at a barrier again; the time between the two barriers
is the run's. Start-up (interpreter, imports, model load, rendezvous) is left out: it does not grow with the
dataset. The clips are the bundled sample clips repeated (``--clips``), or a folder (``--inputs``). Without
``--vae`` a tiny random Wan VAE with random RefDecoder weights is used (CPU check of the scaling, not a speed of
a real model). Launches of the process counts alternate, ``--repeats`` times; the medians are reported with the
load average of the machine at the start and the end (a busy machine depresses the speed-up).

Writes ``benchmarks/results/distributed_throughput.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = 1.6  # 2 processes / 1 process on a 2-core CPU, one thread each (the target)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each rank on cuda:LOCAL_RANK)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    parser.add_argument("--clips", type=int, default=12, help="clips (the bundled ones repeated)")
    parser.add_argument("--inputs", type=Path, help="a folder of videos instead of the bundled clips")
    parser.add_argument("--frames", type=int, default=17, help="frames reconstructed per clip")
    parser.add_argument("--size", default="64x96", help="HxW of the reconstruction")
    parser.add_argument("--vae", help="VAE (default: a tiny random Wan VAE)")
    parser.add_argument("--weights", help="RefDecoder weights (default: random ones for the tiny VAE)")
    parser.add_argument("--repeats", type=int, default=3, help="launches per process count (median reported)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set by the launcher: the run folder
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    """One rank: load, barrier, reconstruct this rank's share, barrier; rank 0 writes the elapsed time."""
    import torch

    from refdecoder.cli.reconstruct import parse_size
    from refdecoder.inference import ReconstructOptions, load_decoder
    from refdecoder.inference.dataset_runs import reconstruct_dataset
    from refdecoder.inference.distributed import (
        barrier,
        close_distributed,
        gather_objects,
        init_distributed,
        rank_context,
    )

    torch.set_num_threads(args.threads)
    ctx = rank_context()
    device = init_distributed(ctx, args.device)
    decoder = load_decoder(args.vae, args.weights, device=device)
    videos = sorted(p for p in (args.worker / "videos").iterdir())
    options = ReconstructOptions(size=parse_size(args.size), max_frames=args.frames)
    with torch.inference_mode():  # warm-up outside the timing: first-call allocations, kernel selection
        reconstruct_dataset(decoder, videos[:1], args.worker / f"warmup{ctx.rank}", options, quiet=True,
                            ctx=type(ctx)())  # fmt: skip
    barrier(ctx)
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = reconstruct_dataset(decoder, videos, args.worker / "out", options, ctx=ctx, quiet=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu = time.process_time() - cpu_started  # this process, all its threads (x264 and PyAV have their own)
    barrier(ctx)
    elapsed = time.perf_counter() - started
    cpus = gather_objects(ctx, cpu)
    if ctx.is_main:
        result = {"seconds": elapsed, "clips": len(videos), "cpu_seconds": sum(cpus)}
        (args.worker / "result.json").write_text(json.dumps(result))
    assert not any("error" in row for row in rows), rows
    close_distributed()


def prepare(args: argparse.Namespace, folder: Path) -> None:
    """The clips (copies of the bundled ones, or links to ``--inputs``) and, without ``--vae``, a tiny model."""
    from refdecoder.data import bundled_clips

    videos = folder / "videos"
    videos.mkdir(parents=True)
    sources = sorted(args.inputs.iterdir()) if args.inputs else bundled_clips()
    for i in range(args.clips if not args.inputs else len(sources)):
        source = sources[i % len(sources)]
        shutil.copy(source, videos / f"{i:04d}_{source.name}")
    if args.vae is None:
        from tests.helpers import save_random_model

        models = save_random_model(folder / "models")
        args.vae, args.weights = str(models["vae"]), str(models["weights"])


def launch(args: argparse.Namespace, procs: int, folder: Path) -> dict[str, float]:
    """One torchrun launch with ``procs`` processes: the seconds between its two barriers, and the CPU seconds
    its processes used meanwhile."""
    run = folder / f"run-{procs}-{time.monotonic_ns()}"
    run.mkdir()
    os.symlink(folder / "videos", run / "videos")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(port),
        __file__, "--worker", str(run), "--device", args.device, "--threads", str(args.threads),
        "--frames", str(args.frames), "--size", args.size, "--vae", args.vae,
    ] + (["--weights", args.weights] if args.weights else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"launch with {procs} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads((run / "result.json").read_text())


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    from benchmarks.common import write_json

    load_before, model_given = os.getloadavg(), args.vae
    with tempfile.TemporaryDirectory(prefix="refdecoder-dist-bench-") as tmp:
        folder = Path(tmp)
        prepare(args, folder)
        clips = len(list((folder / "videos").iterdir()))
        times: dict[int, list[float]] = {n: [] for n in args.procs}
        cpu: dict[int, list[float]] = {n: [] for n in args.procs}
        for _ in range(args.repeats):
            for procs in args.procs:  # interleaved: load on a shared machine hits every count alike
                result = launch(args, procs, folder)
                times[procs].append(result["seconds"])
                cpu[procs].append(result["cpu_seconds"])
                print(f"{procs} process(es): {clips / times[procs][-1]:.3f} clips/s", flush=True)
    load_after = os.getloadavg()
    results = {}
    for procs, runs in times.items():
        median = statistics.median(runs)
        results[str(procs)] = {
            "seconds_median": median,
            "seconds_all": runs,
            "clips_per_s": clips / median,
            # CPU time per clip summed over the processes: equal for every count when splitting adds no work, so
            # the wall-clock speed-up is then limited only by the cores the machine leaves free
            "cpu_seconds_per_clip": statistics.median(cpu[procs]) / clips,
        }
    first = min(args.procs)
    base = results[str(first)]["clips_per_s"]
    for procs, row in results.items():
        row["speedup"] = row["clips_per_s"] / base
        # launches of one repeat ran back to back, so their ratio sees similar load
        row["speedup_per_repeat"] = [a / b for a, b in zip(times[first], times[int(procs)])]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "worker")}
    if model_given is None:
        settings.update(vae="tiny random Wan VAE", weights="random RefDecoder weights")
    payload = {
        "settings": {**settings, "clips": clips},
        "cpus": os.cpu_count(),
        "load_average_1_5_15_before": load_before,
        "load_average_1_5_15_after": load_after,
        "results": results,
    }
    if args.device == "cpu" and "2" in results and "1" in results:
        payload["target_2_over_1"] = TARGET
        payload["met"] = results["2"]["speedup"] >= TARGET
    path = write_json("distributed_throughput", payload, args.out)
    for procs, row in results.items():
        print(
            f"{procs} process(es): median {row['clips_per_s']:.3f} clips/s, {row['speedup']:.2f}x, "
            f"{row['cpu_seconds_per_clip']:.2f} CPU s per clip"
        )
    print(f"load average before {load_before}, after {load_after}; wrote {path}")


if __name__ == "__main__":
    main()
