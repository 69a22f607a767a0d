"""Scaling over processes: end-to-end DDP vs DiffusionBlocks data parallel vs block parallel, same model and
global batch, for 1, 2 and 4 processes (CPU with gloo by default; ``--accelerator gpu`` on a multi-GPU box).

    python benchmarks/scaling.py                      # writes benchmarks/results/scaling_cpu.json + a table

Every configuration is a fresh launch (Lightning starts the other processes), and the configurations are
interleaved (world 1: e2e, dp, bp; world 2: …; then again) so that load on a shared machine hits them
alike; the fastest round is kept. Per configuration: median step time (slowest rank), throughput in
sample-layer evaluations per second (global batch × layers run per step / step time), gradient bytes
all-reduced per step and per process, the seconds of a step spent in that all-reduce, per-process
accounting memory (parameters of the groups the process trains, their gradients and optimizer state, and
the bytes saved for backward), and beside it each process's measured memory:

- on the CPU, the resident set size (``/proc/self/statm``) sampled before each backward pass and after each
  step (``rss_train``: the largest sample, what the process holds while it trains), and the kernel's peak RSS
  (``getrusage``) up to the last training step, which also covers building the whole model at start-up;
- on a GPU, ``torch.cuda.max_memory_allocated`` over the training steps (reset when training starts).

``rss_base`` is the process's RSS after its imports, before it builds the model: what the interpreter and
libraries hold. The table's last column compares the RSS above that start-up figure with end-to-end DDP's.

A block-parallel process keeps only its own groups' weights in memory while it trains, so its measured figure
follows the accounting's 1/B once the weights and optimizer state outweigh the interpreter and libraries
(a few hundred MiB of RSS that every process pays).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from common import machine, write_report
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.memory import SavedTensorMeter, gradient_bytes, optimizer_bytes, parameter_bytes

MODES = ("e2e", "dp", "bp")
MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, as the kernel counts it (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class CountingDDP(DDPStrategy):
    """Lightning's DDP with a communication hook that counts the gradient bytes it all-reduces (any backend)."""

    def configure_ddp(self) -> None:
        super().configure_ddp()
        self.bytes_reduced, self.seconds_reduced = 0, 0.0

        def hook(state, bucket):  # noqa: ANN001, ANN202 - DDP rejects string annotations here
            start = time.perf_counter()
            self.bytes_reduced += bucket.buffer().numel() * bucket.buffer().element_size()
            tensor = bucket.buffer().div_(dist.get_world_size())
            fut = dist.all_reduce(tensor, async_op=True).get_future()
            fut.wait()
            self.seconds_reduced += time.perf_counter() - start
            return fut.then(lambda f: f.value()[0])

        self.model.register_comm_hook(None, hook)


class Probe(L.Callback):
    """Step times and per-process accounting memory, written by rank 0 for all ranks."""

    def __init__(self, args: argparse.Namespace, rss_base: int) -> None:
        self.args, self.times, self.memory, self.measured = args, [], {}, {"rss_base": rss_base}

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _measure(self, pl_module) -> None:  # noqa: ANN001
        """Sample what the process holds now (called before each backward pass and after each step)."""
        self.measured["rss_train"] = max(self.measured.get("rss_train", 0), rss_bytes())
        # the kernel's high-water mark lags its batched counters a little; it is never below a sample
        self.measured["rss_peak"] = max(peak_rss_bytes(), self.measured["rss_train"])
        if pl_module.device.type == "cuda":
            self.measured["cuda_peak"] = torch.cuda.max_memory_allocated(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        self._start = time.perf_counter()
        self._meter = SavedTensorMeter(exclude=pl_module.parameters()).__enter__()

    def on_before_backward(self, trainer, pl_module, loss):  # noqa: ANN001, ANN201
        self._measure(pl_module)  # the activations of the step are all alive here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        self._meter.__exit__(None, None, None)
        self.times.append(time.perf_counter() - self._start)
        self._measure(pl_module)
        trained = [g for g in range(pl_module.num_blocks) if int(pl_module.group_steps[g]) > 0]
        params = [p for g in trained for p in pl_module.network.group_parameters(g)]
        params += pl_module.network.shared_parameters()
        current = {"params": parameter_bytes(params), "grads": gradient_bytes(pl_module.parameters()),
                   "optimizer": optimizer_bytes(trainer.optimizers[0]), "activations": self._meter.bytes}  # fmt: skip
        for k, v in current.items():
            self.memory[k] = max(self.memory.get(k, 0), v)

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        strategy = trainer.strategy
        steps = len(self.times)
        mine = {"times": self.times[self.args.warmup :], "memory": self.memory, "measured": self.measured,
                "bytes_per_step": getattr(strategy, "bytes_reduced", 0) / steps,
                "reduce_seconds_per_step": getattr(strategy, "seconds_reduced", 0.0) / steps}  # fmt: skip
        gathered = [None] * trainer.world_size
        if trainer.world_size > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if trainer.is_global_zero:
            Path(self.args.report).write_text(json.dumps(gathered))


def child(args: argparse.Namespace) -> None:
    rss_base = rss_bytes()  # the interpreter and libraries, before any model exists
    torch.manual_seed(0)
    torch.set_num_threads(max(1, args.threads // args.world))
    blocks = 1 if args.mode == "e2e" else args.blocks
    net = ldb.presets.demo_dit(image_size=16, patch=2, dim=args.dim, depth=args.depth)
    module = ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=blocks)
    backend = {"process_group_backend": "gloo"} if args.accelerator == "cpu" else {}
    strategy = {"e2e": lambda: CountingDDP(**backend), "dp": lambda: ldb.DiffusionBlocksDDPStrategy(**backend),
                "bp": lambda: ldb.BlockParallelStrategy(**backend)}[args.mode]()  # fmt: skip
    per_rank = args.global_batch // args.world
    g = torch.Generator().manual_seed(0)
    n = args.global_batch * (args.steps + args.warmup)
    data = TensorDataset(torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))
    trainer = L.Trainer(strategy=strategy, accelerator=args.accelerator, devices=args.world,
                        max_steps=args.steps + args.warmup, callbacks=[Probe(args, rss_base)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=per_rank))
    if dist.is_available() and dist.is_initialized():  # leave gloo's threads joined before the interpreter exits
        dist.barrier()
        dist.destroy_process_group()


def summarise(args: argparse.Namespace, mode: str, world: int, ranks: list[dict]) -> dict:
    per_step = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]  # the slowest rank
    step = statistics.median(per_step)
    layers = args.depth if mode == "e2e" else args.depth / args.blocks
    memory = {k: max(r["memory"][k] for r in ranks) / MIB for k in ranks[0]["memory"]}
    # each process's own measurement, rank by rank
    measured = {k: [r["measured"][k] / MIB for r in ranks] for k in ranks[0]["measured"]}
    return {"mode": mode, "world": world, "step_seconds": step, "step_times": per_step,
            "throughput": args.global_batch * layers / step,
            "bytes_per_step": max(r["bytes_per_step"] for r in ranks),
            "reduce_seconds_per_step": max(r["reduce_seconds_per_step"] for r in ranks),
            "memory_mib": memory, "memory_total_mib": sum(memory.values()),
            "measured_mib": measured}  # fmt: skip


def table(rows: list[dict], blocks: int) -> str:
    e2e = {r["world"]: r for r in rows if r["mode"] == "e2e"}
    own = {(r["mode"], 1): r for r in rows if r["world"] == 1}
    measured = "cuda_peak" if "cuda_peak" in rows[0]["measured_mib"] else "rss_train"
    label = "CUDA peak" if measured == "cuda_peak" else "RSS in training"
    start = "" if measured == "cuda_peak" else "rss_base"

    def held(r: dict) -> float:  # the largest process's measured memory (on the CPU: above its start-up RSS)
        m = r["measured_mib"]
        return max(x - (m[start][i] if start else 0.0) for i, x in enumerate(m[measured]))

    head = ["config", "procs", "step ms", "sample-layers/s", "vs own 1-proc", "all-reduce MiB/step",
            "bytes vs e2e", "all-reduce ms/step", "memory MiB/proc", "memory vs e2e", "1/B",
            f"measured {label} MiB, each proc", "measured vs e2e" + (" (above start-up)" if start else "")]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {"e2e": "end-to-end DDP", "dp": "DiffusionBlocks data parallel", "bp": "DiffusionBlocks block parallel"}
    for r in rows:
        base = e2e[r["world"]]
        ratio = r["bytes_per_step"] / base["bytes_per_step"] if base["bytes_per_step"] else float("nan")
        cells = [names[r["mode"]], str(r["world"]), f"{1000 * r['step_seconds']:.1f}", f"{r['throughput']:.0f}",
                 f"{r['throughput'] / own[(r['mode'], 1)]['throughput']:.2f}", f"{r['bytes_per_step'] / MIB:.2f}",
                 f"{ratio:.3f}", f"{1000 * r['reduce_seconds_per_step']:.1f}", f"{r['memory_total_mib']:.1f}",
                 f"{r['memory_total_mib'] / base['memory_total_mib']:.3f}", f"{1 / blocks:.3f}",
                 " / ".join(f"{m:.0f}" for m in r["measured_mib"][measured]),
                 f"{held(r) / held(e2e[r['world']]):.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest round is kept")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, shared by processes")
    p.add_argument("--out", default=None)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        child(args)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for world in worlds:
            for mode in MODES:
                report = Path(f"/tmp/scaling_{os.getpid()}_{mode}_{world}.json")
                cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--world", str(world),
                       "--report", str(report)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0 or not report.exists():
                    sys.exit(f"{mode} with {world} processes failed:\n{out.stderr[-4000:]}")
                runs.setdefault((mode, world), []).append(summarise(args, mode, world, json.loads(report.read_text())))
                print(f"round {repeat}: {mode} x{world}: {1000 * runs[(mode, world)][-1]['step_seconds']:.1f} ms/step",
                      flush=True)  # fmt: skip
    rows = []
    for results in runs.values():  # the least disturbed round: load on a shared machine only ever slows a run down
        fastest = min(results, key=lambda r: r["step_seconds"])
        rows.append({**fastest, "rounds": [r["step_seconds"] for r in results]})
    rows.sort(key=lambda r: (r["world"], MODES.index(r["mode"])))
    text = table(rows, args.blocks)
    meta = machine("python benchmarks/scaling.py " + " ".join(sys.argv[1:]), args.accelerator == "gpu")
    meta["cpu_count"] = os.cpu_count()
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    write_report(args.out, f"scaling_{device}.json", {"meta": meta, "rows": rows, "table": text}, text)


if __name__ == "__main__":
    main()
