"""
The GPU check's CPU dry run: `SMOKE=1 DEVICE=cpu bash speedrun.sh` runs every stage of the gpu profile (its launch,
its flags, torch.compile where it compiles) at tiny sizes on the synthetic world, in a root under tmp_path, and
writes smoke.md, what each stage ran on (scripts/smoke_report.py). About 2.5 minutes on 2 cores.
"""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT

# every stage of the smoke run (SEEDS=1, DPO=1, CONTROL off) and the output that says it finished, in run order
STAGES = {
    "tokenizer": "outs/tokenizer/tokenizer.json", "base": "outs/base/ckpt.pt", "mid": "outs/mid/ckpt.pt",
    "pairs": ".cache/data/pairs_all.jsonl", "sft": "outs/sft/ckpt.pt", "prompts": ".cache/data/prompts_all.jsonl",
    "eval_base": "outs/eval_base/results.json", "eval_sft": "outs/eval_sft/results.json",
    "density": ".cache/data/density.jsonl", "rm": "outs/rm/ckpt.pt",
    "grpo_density_s1": "outs/grpo_density_s1/ckpt.pt", "grpo_baseline_s1": "outs/grpo_baseline_s1/ckpt.pt",
    "diversity": "outs/diversity/diversity_report.md", "dpo_density_s1": "outs/dpo_density_s1/ckpt.pt",
    "dpo_baseline_s1": "outs/dpo_baseline_s1/ckpt.pt", "diversity_dpo": "outs/diversity_dpo/diversity_report.md",
    "autodeco_init": "outs/autodeco_init/ckpt.pt", "autodeco": "outs/autodeco/ckpt.pt",
    "autodeco_eval": "outs/eval_autodeco/results.json", "star": "outs/star/ckpt.pt",
    "workflow_sft": "outs/workflow_sft/ckpt.pt", "workflow": "outs/workflow/ckpt.pt",
    "workflow_eval": "outs/workflow_eval/workflow_eval.md",
}
MODEL_FREE = {"tokenizer", "pairs", "prompts", "autodeco_init"}  # stages that run no attention
# the caller's settings of speedrun.sh would change what runs; the test sets its own
SPEEDRUN_KNOBS = ("PROFILE", "DEPTH", "NPROC_PER_NODE", "LANES", "SEEDS", "COMPILE", "FORCE", "DPO", "AUTODECO", "STAR",
                  "WORKFLOW", "CONTROL", "WANDB_RUN", "CUDA_VISIBLE_DEVICES", "SMOKE_STATS", "SMOKE_STAGE")


def table_rows(path):
    """smoke.md's table as {stage: [cells]}."""
    rows = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and cells[0] not in ("stage", "---"):
            rows[cells[0]] = cells
    return rows


def test_smoke_cpu_dry_run_runs_every_stage(tmp_path):
    # catches: a change to a stage, its flags or speedrun.sh that breaks the gpu profile's pipeline (torchrun-shaped
    # launch, torch.compile of base and mid, every stage after them) where no GPU run would show it for hours
    assert os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")), "speedrun.sh runs .venv: bash tests/run.sh"
    root = tmp_path / "smoke"
    env = {k: v for k, v in os.environ.items() if k not in SPEEDRUN_KNOBS}
    # one thread: at these sizes a second one only waits (and on 2 shared cores slows every stage down)
    env.update(SMOKE="1", DEVICE="cpu", SMOKE_ROOT=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "speedrun.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    missing = [f"{stage}: {out}" for stage, out in STAGES.items() if not (root / out).exists()]
    assert not missing, f"stages without their output: {missing}"
    assert f"smoke=1 root={root}" in (root / "outs" / "speedrun.log").read_text(), "the stages ran outside SMOKE_ROOT"

    rows = table_rows(root / "smoke.md")
    assert list(rows) == list(STAGES), "smoke.md lists every stage, in the order they ran"
    for stage, (_, wall, device, bf16, compiled, flash, speed, peak) in rows.items():
        assert wall.isdigit() and device == "cpu" and peak.endswith("MiB RSS"), rows[stage]
        if stage in MODEL_FREE:
            assert flash == "— (no attention)", rows[stage]
        else:  # what the probe saw: CPU runs in fp32 and SDPA picks its flash kernel for this model's shapes
            assert flash.startswith("yes (flash") and bf16.startswith("no (0/"), rows[stage]
        assert compiled.startswith("yes (") == (stage in ("base", "mid")), rows[stage]  # as the gpu profile
    assert rows["base"][6].endswith("tok/s") and rows["rm"][6].endswith("pairs/s")
    records = [json.loads(line) for line in open(root / "smoke_stats.jsonl", encoding="utf-8")]
    assert all(r["status"] == 0 for r in records) and {r["stage"] for r in records} == set(STAGES)


def test_smoke_summary_names_stages_without_a_record(tmp_path):
    # catches: a table that shows a stage run outside the probe (or one that failed) as if it had been measured
    (tmp_path / "times.tsv").write_text("base\t5s\nsft\t3s\n")
    record = {"stage": "base", "module": "scripts.base_train", "rank": 0, "world_size": 1, "status": 0,
              "seconds": 4.0, "device": "cuda", "gpu": "NVIDIA H200", "attention": {"flash": 6, "efficient": 2},
              "bf16_calls": 8, "compiled_graphs": 1, "graph_breaks": {}, "peak_gpu_bytes": 3 * 2**30,
              "peak_rss_bytes": 2**30, "tokens_per_second": 123456.0, "pairs_per_second": None}
    failed = dict(record, stage="rm", status=1, attention={}, bf16_calls=0, compiled_graphs=0, peak_gpu_bytes=None)
    (tmp_path / "stats.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(failed) + "\n")
    proc = subprocess.run([sys.executable, "-m", "scripts.smoke_report", "--summary", "--times_path=times.tsv",
                           "--stats_path=stats.jsonl", "--out_path=smoke.md"], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1 and "no record of sft" in proc.stdout, proc.stdout + proc.stderr
    rows = table_rows(tmp_path / "smoke.md")
    assert rows["base"] == ["base", "5", "cuda (NVIDIA H200)", "yes (8/8 attention calls)", "yes (1 graphs)",
                            "yes (flash 6, efficient 2 of 8 eager calls)", "123,456 tok/s", "3,072 MiB GPU"]
    assert rows["sft"][2] == "no record" and rows["rm"][1] == "failed (exit 1)"


def test_probe_keeps_the_stage_exit_status_and_records_it(tmp_path):
    # catches: the probe swallowing a stage's failure (speedrun.sh would go on as if it had finished)
    env = dict(os.environ, PYTHONPATH=ROOT, SMOKE_STAGE="eval", SMOKE_STATS=str(tmp_path / "stats.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "scripts.smoke_report", "-m", "scripts.chat_eval", "--",
                           "--ckpt_path=missing"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "missing" in proc.stderr, proc.stderr
    [record] = [json.loads(line) for line in open(tmp_path / "stats.jsonl", encoding="utf-8")]
    assert record["stage"] == "eval" and record["status"] == 1 and record["module"] == "scripts.chat_eval"
