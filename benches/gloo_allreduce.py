"""PyTorch gloo all-reduce on 127.0.0.1, printed as `tandem bench allreduce` prints it.

    python benches/gloo_allreduce.py --world 2 --sizes 16MiB,64MiB --iters 15

One JSON line per size: bytes, median_ms and busbw_gbps (2(n-1)/n * bytes / time), so the
figures sit beside tandem's in BENCHMARKS.md. gloo sends in clear (PyTorch documents its
distributed stack as for trusted networks only).
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_size(s):
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def rank_main(rank, world, port, sizes, iters):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for size in sizes:
        buf = torch.full((size // 4,), 1.0 + rank / 8)
        dist.barrier()
        dist.all_reduce(buf)
        times = []
        for _ in range(iters):
            buf.fill_(1.0 + rank / 8)
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times)
        if rank == 0:
            busbw = 2 * (world - 1) / world * size / (ms / 1e3) / 1e9
            print(json.dumps({"world": world, "bytes": size, "median_ms": ms,
                              "busbw_gbps": busbw, "transport": "gloo"}), flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default="16MiB,64MiB")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--port", type=int, default=29533)
    a = p.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    mp.spawn(rank_main, args=(a.world, a.port, sizes, a.iters), nprocs=a.world)


if __name__ == "__main__":
    main()
