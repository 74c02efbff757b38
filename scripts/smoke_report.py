"""
The smoke run's instrument (`SMOKE=1 bash speedrun.sh`): runs one stage the way `python -m` would and records what
it ran on, then writes the per-stage table.

    python -m scripts.smoke_report -m scripts.base_train -- --depth=2      # a stage, probed (SMOKE_STAGE names it)
    torchrun --standalone --nproc_per_node=2 -m scripts.smoke_report -m scripts.base_train -- --depth=2
    python -m scripts.smoke_report --summary                               # smoke.md from the records

Probing changes nothing the stage computes: the module runs in this process as `__main__` with its own arguments,
and its exit status is this process's. Each process (each torchrun rank) appends one JSON line to $SMOKE_STATS
(default smoke_stats.jsonl) when the stage ends: the stage's name ($SMOKE_STAGE, set by speedrun.sh's run_stage),
its device, whether bf16 autocast was on and which kernel scaled_dot_product_attention picked for each eager call
(torch's own choice for those inputs: `torch._fused_sdp_choice`, with autocast's cast applied; calls inside a
torch.compile graph are not seen), how many graphs torch.compile built, its peak memory (torch.cuda's
max_memory_allocated on a GPU; the process's peak RSS always) and the throughput its report states
(tokens_per_second, pairs_per_second).

`--summary` joins those records with run_stage's wall times (outs/speedrun_times.tsv) into smoke.md: one row per
stage in the order it ran. A stage that ran but left no record is listed with "no record" and makes the exit
status 1.
"""

import argparse
import json
import os
import platform
import resource
import runpy
import sys
import time
from collections import Counter

BACKENDS = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class Probe:
    """What one process of a stage ran on, collected while it runs."""

    def __init__(self):
        self.attention = Counter()  # kernel name -> eager scaled_dot_product_attention calls
        self.bf16_calls = 0         # of those, calls under bf16 autocast or on bf16 tensors
        self.reports = []           # (device, timings) of each write_report call

    def install(self):
        import torch
        import torch.nn.functional as F
        import nanochat.report
        real_sdpa, real_write_report = F.scaled_dot_product_attention, nanochat.report.write_report

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            if not torch.compiler.is_compiling():  # inside a graph nothing is recorded, and the graph stays as it is
                self.record_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, kwargs)
            return real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, **kwargs)

        def write_report(stage_dir, metrics, timings=None, flags=None, device=None, *args, **kwargs):
            self.reports.append({"device": None if device is None else str(device), "timings": dict(timings or {})})
            return real_write_report(stage_dir, metrics, timings, flags, device, *args, **kwargs)

        F.scaled_dot_product_attention = sdpa
        nanochat.report.write_report = write_report  # scripts and nanochat.stage import it after this

    def record_attention(self, query, key, value, attn_mask, dropout_p, is_causal, scale, kwargs):
        import torch
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type) and query.dtype == torch.float32:
            dtype = torch.get_autocast_dtype(device_type)  # what autocast casts the inputs to before dispatching
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(dtype)
        if query.dtype == torch.bfloat16:
            self.bf16_calls += 1
        try:
            choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                             enable_gqa=kwargs.get("enable_gqa", False))
            self.attention[BACKENDS.get(int(choice), str(choice))] += 1
        except (RuntimeError, TypeError):  # another torch's signature: counted, kernel unknown
            self.attention["unknown"] += 1

    def record(self, stage, module, status, seconds):
        import torch
        peak_gpu, gpu = None, None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak_gpu, gpu = torch.cuda.max_memory_allocated(), torch.cuda.get_device_name()
        dynamo = sys.modules.get("torch._dynamo.utils")
        graphs, breaks = 0, Counter()
        if dynamo is not None:
            graphs = int(dynamo.counters["stats"]["unique_graphs"])
            for kind in ("graph_break", "unimplemented"):  # where torch versions count graph breaks, by reason
                for reason, n in dynamo.counters[kind].items():
                    breaks[str(reason).strip().splitlines()[0]] += n
        devices = [r["device"] for r in self.reports if r["device"]]
        timings = {k: v for r in self.reports for k, v in r["timings"].items()}
        return {"stage": stage, "module": module, "rank": int(os.environ.get("RANK", "0")),
                "world_size": int(os.environ.get("WORLD_SIZE", "1")), "status": status, "seconds": seconds,
                "device": devices[0] if devices else ("cuda" if gpu else "cpu"), "gpu": gpu,
                "attention": dict(self.attention), "bf16_calls": self.bf16_calls, "compiled_graphs": graphs,
                "graph_breaks": dict(breaks),
                "peak_gpu_bytes": peak_gpu, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "tokens_per_second": timings.get("tokens_per_second"),
                "pairs_per_second": timings.get("pairs_per_second")}


def probe(module, argv):
    """Run `module` as `python -m module argv...` would, then append this process's record to $SMOKE_STATS."""
    stage = os.environ.get("SMOKE_STAGE", module)
    p = Probe()
    p.install()
    t0, status = time.time(), 0
    sys.argv = [module] + argv
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except BaseException:
        status = 1
        raise
    finally:
        line = json.dumps(p.record(stage, module, status, time.time() - t0)) + "\n"
        fd = os.open(os.environ.get("SMOKE_STATS", "smoke_stats.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write with O_APPEND: ranks writing at once do not interleave
        finally:
            os.close(fd)


# -----------------------------------------------------------------------------
# the table

def mib(n):
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def cell(text):
    return str(text).replace("|", "\\|")


def stage_row(name, wall, records):
    """One markdown row: the stage's wall time and what its processes (all ranks) ran on."""
    if not records:
        return f"| {name} | {wall} | no record | | | | | |"
    first = min(records, key=lambda r: r["rank"])
    attention = Counter()
    for r in records:
        attention.update(r["attention"])
    calls, bf16 = sum(attention.values()), sum(r["bf16_calls"] for r in records)
    device = first["device"] + (f" ({first['gpu']})" if first["gpu"] else "") + (
        f" x{first['world_size']}" if first["world_size"] > 1 else "")
    if calls:
        kernels = ", ".join(f"{k} {v}" for k, v in attention.most_common())
        flash = f"{'yes' if attention['flash'] else 'no'} ({kernels} of {calls} eager calls)"
        bf16_cell = f"{'yes' if bf16 else 'no'} ({bf16}/{calls} attention calls)"
    else:
        flash = bf16_cell = "— (no attention)"
    graphs = max(r["compiled_graphs"] for r in records)
    breaks = Counter(first.get("graph_breaks", {}))  # every rank compiles the same graphs
    compiled = "no" if not graphs else f"yes ({graphs} graphs" + "".join(
        f"; graph break x{n}: {reason}" for reason, n in breaks.most_common()) + ")"
    if first["tokens_per_second"] is not None:
        speed = f"{first['tokens_per_second']:,.0f} tok/s"
    elif first["pairs_per_second"] is not None:
        speed = f"{first['pairs_per_second']:,.1f} pairs/s"
    else:
        speed = "—"
    gpu_peaks = [r["peak_gpu_bytes"] for r in records if r["peak_gpu_bytes"] is not None]
    peak = f"{mib(max(gpu_peaks))} GPU" if gpu_peaks else f"{mib(max(r['peak_rss_bytes'] for r in records))} RSS"
    return "| " + " | ".join(cell(c) for c in (name, wall, device, bf16_cell, compiled, flash, speed, peak)) + " |"


def summary(times_path, stats_path, out_path):
    """
    Write smoke.md: a row per stage run_stage timed, then one per stage that failed (a record, no time). Returns
    the names of timed stages without a record.
    """
    times = []
    if os.path.exists(times_path):
        with open(times_path, encoding="utf-8") as f:
            for line in f:
                name, _, seconds = line.rstrip("\n").partition("\t")
                if name:
                    times.append((name, seconds.removesuffix("s")))
    records = {}
    if os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                records.setdefault(record["stage"], []).append(record)
    timed = {name for name, _ in times}
    failed = [(name, f"failed (exit {max(r['status'] for r in rs)})", rs) for name, rs in records.items()
              if name not in timed]
    import torch
    lines = ["# Smoke run: every stage of the gpu profile at tiny sizes", "",
             f"_written {time.strftime('%Y-%m-%d %H:%M:%S')}; python {platform.python_version()}, torch "
             f"{torch.__version__}, {os.cpu_count()} CPUs_", "",
             "Wall seconds as speedrun.sh timed the stage. Attention: the kernel torch picks for each eager "
             "scaled_dot_product_attention call (on a CPU, flash is its CPU flash kernel; calls inside torch.compile "
             "graphs are not seen); bf16: those calls that ran in bfloat16 (autocast). torch.compile: the graphs "
             "built and the graph breaks. Peak memory: torch.cuda.max_memory_allocated on a GPU, else the process's "
             "peak RSS (the largest rank's). Throughput where the stage reports it.", "",
             "| stage | wall s | device | bf16 autocast | torch.compile | flash attention | throughput | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [stage_row(name, wall, records.get(name, [])) for name, wall in times]
    lines += [stage_row(name, wall, rs) for name, wall, rs in failed]
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [name for name, _ in times if name not in records]


def main():
    if sys.argv[1:2] == ["-m"] and len(sys.argv) > 2:
        return probe(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true", help="write the table from the records")
    parser.add_argument("--times_path", type=str, default="outs/speedrun_times.tsv", help="run_stage's wall times")
    parser.add_argument("--stats_path", type=str, default=os.environ.get("SMOKE_STATS", "smoke_stats.jsonl"))
    parser.add_argument("--out_path", type=str, default="smoke.md")
    args = parser.parse_args()
    if not args.summary:
        parser.error("give -m MODULE [ARGS...] to run a stage, or --summary")
    missing = summary(args.times_path, args.stats_path, args.out_path)
    print(f"Wrote {args.out_path}" + (f"; no record of {', '.join(missing)}" if missing else ""))
    if missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
