"""Peak memory per rank of the vocabulary-parallel losses against torch's loss_parallel() + F.cross_entropy.

    python -m benchmarks.distributed_memory [--world 2] [--rows 512] [--hidden 256] [--out FILE]

Spawns `world` CPU processes (gloo, loopback). On each rank, for V = 32000 and 128256:
  logits given (Shard(-1), as ColwiseParallel on the head gives):
    torch      loss_parallel() + F.cross_entropy, forward + backward
    torch_vjp  torch_vjp.cross_entropy (vocabulary-parallel: per-row all-reduces only)
  from the hidden states (the head's weight Shard(0) on the vocabulary):
    torch      ColwiseParallel-style head (h Wᵀ on the local rows of W) + loss_parallel() + F.cross_entropy
    torch_vjp  torch_vjp.fused_linear_cross_entropy (no rank forms more than a chunk of its logits)
The peak is the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs before each run)
above its resident memory at the start of the run, the inputs already allocated: what the loss itself adds.
Linux only. Times are wall-clock on a shared CPU: indicative.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(fn):
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so that reuse counts again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _rss_mib("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return _rss_mib("VmHWM") - base, seconds


def _worker(rank, world, port, rows, hidden, out_dir):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch_vjp
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    lines = []
    for vocab in (32000, 128256):
        torch.manual_seed(0)
        target = torch.randint(0, vocab, (rows,))
        logits = distribute_tensor(torch.randn(rows, vocab), mesh, [Shard(1)])
        h = torch.randn(rows, hidden)
        weight = distribute_tensor(torch.randn(vocab, hidden) / hidden ** 0.5, mesh, [Shard(0)])
        target_d = distribute_tensor(target, mesh, [Replicate()])

        def torch_logits():
            x = logits.detach().requires_grad_()
            with loss_parallel():
                F.cross_entropy(x, target_d).backward()

        def vjp_logits():
            x = logits.detach().requires_grad_()
            torch_vjp.cross_entropy(x, target).backward()

        def torch_head():
            w = weight.detach().requires_grad_()
            hd = distribute_tensor(h, mesh, [Replicate()]).requires_grad_()
            local = hd.to_local() @ w.to_local().t()  # ColwiseParallel's local product
            x = DTensor.from_local(local, mesh, [Shard(1)], run_check=False)
            with loss_parallel():
                F.cross_entropy(x, target_d).backward()

        def vjp_head():
            w = weight.detach().requires_grad_()
            hd = distribute_tensor(h, mesh, [Replicate()]).requires_grad_()
            torch_vjp.fused_linear_cross_entropy(hd, w, target).backward()

        shard_mib = rows * vocab * 4 / world / 2**20
        for label, fn in (("logits given: loss_parallel() + F.cross_entropy", torch_logits),
                          ("logits given: torch_vjp.cross_entropy", vjp_logits),
                          ("from hidden: ColwiseParallel head + loss_parallel() + F.cross_entropy", torch_head),
                          ("from hidden: torch_vjp.fused_linear_cross_entropy", vjp_head)):
            fn()  # warm-up
            dist.barrier()
            peak, seconds = _measure(fn)
            lines.append((vocab, label, peak, seconds, shard_mib))
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        for vocab, label, peak, seconds, shard in lines:
            f.write(f"{vocab}\t{label}\t{peak:.1f}\t{seconds * 1e3:.1f}\t{shard:.1f}\n")
    dist.destroy_process_group()


def main():
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # every large allocation its own mapping, returned when freed (glibc): the resident peak is the tensors'
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 17))
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(args.world, port, args.rows, args.hidden, out_dir), nprocs=args.world)
        table = [f"Peak resident memory added per rank (MiB) and time (ms), N = {args.rows} rows, H = {args.hidden}, "
                 f"{args.world} ranks (gloo, CPU), float32.", "",
                 "| V | path | rank | peak MiB | ms | local logits shard MiB |", "|---|---|---|---|---|---|"]
        for rank in range(args.world):
            with open(os.path.join(out_dir, f"{rank}.txt")) as f:
                for line in f:
                    vocab, label, peak, ms, shard = line.rstrip("\n").split("\t")
                    table.append(f"| {vocab} | {label} | {rank} | {peak} | {ms} | {shard} |")
    command = (f"python -m benchmarks.distributed_memory --world {args.world} --rows {args.rows} "
               f"--hidden {args.hidden}")
    text = "\n".join(table + ["", f"Command: `{command}`"]) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
