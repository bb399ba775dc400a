"""Scaling benchmark: images/s of `dhr propagate` and `dhr cams --uss lite0` with 1 and 2 processes.

The 2-process runs are `torchrun --standalone --nproc-per-node 2 ... -m dhr_cli <command>`
(items sharded by rank, one store per rank, rank 0 merges; gloo for the barrier); on the CPU
each of the two processes uses ONE torch thread, so that the two processes use as many cores
as the "1 process, 2 threads" run. Three configurations are timed, on the same items:

    1 process  x 1 thread     the unit: what one core does
    1 process  x 2 threads    plain `dhr ...` on two cores (torch's intra-op threads)
    2 processes x 1 thread    `torchrun --nproc-per-node 2` on two cores

(on CUDA, --device cuda: 1 and 2 processes, each on GPU local_rank % count; threads are left
alone). Inputs: the VOC-sized inputs of bench/propagate.py (375x500 images, USS 90x27x36, WSS
256x24x32 and 256x12x16 float16 stores), with the command's defaults (CRF on). Time is measured
inside each process from the moment every rank has imported torch and dhr_cli (a gloo barrier)
to the end of the command, merge included; Python/torch start-up is not counted but shown
(`launcher_wall_s`, the whole torchrun command). A shared machine makes the figures noisy;
--rounds keeps the best of several interleaved rounds.

    python bench/scaling.py --out bench_out/scaling              # writes scaling.json (~2-3 min on 2 cores)
    python bench/scaling.py --out /tmp/s --items 8 --cams-items 4  # quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench_propagate():
    """bench/propagate.py as a module (its VOC-like dataset writer), whatever the working directory."""
    spec = importlib.util.spec_from_file_location("bench_propagate", Path(__file__).with_name("propagate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- child: one process of a run (plain, or one rank under torchrun) ---------------------------
def _child(argv: list[str], threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from dhr_cli.cli import app  # imported before the clock starts, like torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # start the clock when every rank is ready; dhr_cli.io.distributed reuses this group
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()
    t0 = time.perf_counter()
    try:
        app(argv, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    took = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        print("SCALING " + json.dumps({"seconds": took, "torch_threads": torch.get_num_threads()}), flush=True)


# ---- parent ------------------------------------------------------------------------------------
def _run(command: list[str], n: int, procs: int, threads: int, device: str) -> dict:
    child = [str(Path(__file__).resolve()), "--child-threads", str(threads), "--child", *command]
    if procs == 1:
        argv = [sys.executable, *child]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *child]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SCALING "))
    r = json.loads(line[len("SCALING "):])
    return {"processes": procs, "threads_per_process": r["torch_threads"] if device == "cpu" else None,
            "seconds": r["seconds"], "img_s": n / r["seconds"], "launcher_wall_s": wall}


def _configs(device: str) -> list[tuple[int, int]]:
    if device != "cpu":
        return [(1, 0), (2, 0)]
    return [(1, 1), (1, 2), (2, 1)]


def _key(procs: int, threads: int) -> str:
    return f"{procs}proc" + (f"_x{threads}thread" if threads else "")


def bench(name: str, command_for, n: int, device: str, rounds: int) -> dict:
    """Best of `rounds` interleaved rounds of each configuration."""
    best: dict[str, dict] = {}
    for k in range(rounds):
        for procs, threads in _configs(device):
            key = _key(procs, threads)
            r = _run(command_for(key), n, procs, threads, device)
            if key not in best or r["seconds"] < best[key]["seconds"]:
                best[key] = r
            print(f"[{name}] round {k + 1}: {procs} process(es) x {threads or 'default'} thread(s): "
                  f"{r['img_s']:.2f} img/s ({r['seconds']:.1f} s in the command, {r['launcher_wall_s']:.1f} s wall)",
                  flush=True)
    result: dict = {"items": n, "rounds": rounds, "runs": best}
    unit = best[_key(1, 1 if device == "cpu" else 0)]["img_s"]
    two = best[_key(2, 1 if device == "cpu" else 0)]["img_s"]
    result["speedup_2proc_vs_1proc"] = two / unit
    if device == "cpu":
        result["speedup_1proc_2threads_vs_1thread"] = best[_key(1, 2)]["img_s"] / unit
        result["speedup_2proc_vs_1proc_2threads"] = two / best[_key(1, 2)]["img_s"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/scaling"))
    parser.add_argument("--items", type=int, default=24, help="images for `dhr propagate`")
    parser.add_argument("--cams-items", type=int, default=6, help="images for `dhr cams --uss lite0` (0: skip it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (best kept)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.child_threads)
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 1
    result: dict = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "cpu_count": os.cpu_count(), "gpu_count": torch.cuda.device_count(),
        "platform": platform.platform(), "torch": torch.__version__,
        "load_average_at_start": list(os.getloadavg()),
        "threads_note": ("CPU: each process of the 2-process runs uses 1 torch thread (OMP_NUM_THREADS=1, "
                         "torch.set_num_threads(1)); compare with 1 process x 1 thread (per-core scaling) and "
                         "1 process x 2 threads (same cores, intra-op threads)") if args.device == "cpu" else
                        "CUDA: every process on GPU local_rank % gpu_count; torch threads left at their default",
        "timing_note": ("seconds: from all ranks ready (torch and dhr_cli imported, gloo barrier) to the end of the "
                        "command, merge of the per-rank stores included; launcher_wall_s: the whole command "
                        "with interpreter start-up"),
        "inputs": "bench/propagate.py VOC-like: 375x500 images, USS 90x27x36, WSS 256x24x32 + 256x12x16, float16",
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        n = max(args.items, args.cams_items)
        _bench_propagate().write_dataset(data, n)
        ids = (data / "splits" / "all.txt").read_text().split()
        (data / "splits" / "prop.txt").write_text("\n".join(ids[: args.items]) + "\n")
        (data / "splits" / "cams.txt").write_text("\n".join(ids[: args.cams_items]) + "\n")

        def propagate(key: str) -> list[str]:
            return ["propagate", "--seeds", str(data / "seeds.h5"), "--data", str(data), "--split", "prop",
                    "--uss", str(data / "uss.h5"), "--wss", str(data / "wss0.h5"), "--wss", str(data / "wss1.h5"),
                    "--device", args.device, "--out", str(Path(tmp) / f"masks-{key}.h5"), "--overwrite", "--quiet"]

        result["propagate"] = bench("propagate", propagate, args.items, args.device, args.rounds)
        if args.cams_items:
            def cams(key: str) -> list[str]:
                return ["cams", "--data", str(data), "--split", "cams", "--uss", "lite0", "--device", args.device,
                        "--out", str(Path(tmp) / f"uss-{key}.h5"), "--overwrite", "--quiet"]

            result["cams_uss_lite0"] = bench("cams --uss lite0", cams, args.cams_items, args.device, args.rounds)
    result["load_average_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    for name in ("propagate", "cams_uss_lite0"):
        if name in result:
            r = result[name]
            print(f"{name}: " + ", ".join(f"{k} {v['img_s']:.2f} img/s" for k, v in r["runs"].items())
                  + f"; 2 processes / 1 process: x{r['speedup_2proc_vs_1proc']:.2f}")
    print(f"wrote {args.out / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
