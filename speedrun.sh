#!/usr/bin/env bash
# The whole pipeline, end to end: set-up, tokenizer, base, mid, SFT, preference pairs, prompts, evaluation,
# density weights, reward model, GRPO with density-aware and with uniform prompt sampling (SEEDS training seeds
# each), the diversity report; DPO arms too with DPO=1; AutoDeco's heads and their evaluation; STaR; workflow GRPO;
# the positive control with CONTROL=1.
#
#   bash speedrun.sh                          # picks the profile: gpu when CUDA GPUs are visible, else cpu
#   PROFILE=cpu bash speedrun.sh              # synthetic world, depth 4, vocab 1024: minutes on a laptop
#   PROFILE=gpu NPROC_PER_NODE=8 bash speedrun.sh   # FineWeb-Edu + SmolTalk, depth 20, torchrun over 8 GPUs
#   SEEDS=5 bash speedrun.sh                  # 5 training seeds per arm (default 3): a tighter across-seed CI
#   LANES=1 bash speedrun.sh                  # RLHF runs one at a time (cpu default: 2 side by side)
#   CONTROL=1 bash speedrun.sh                # then the positive control: SFT artifacts only on rare clusters
#   AUTODECO=0 bash speedrun.sh               # without AutoDeco (per-token temperature heads and their comparison)
#   STAR=0 bash speedrun.sh                   # without STaR (rationale self-training, two languages)
#   WORKFLOW=0 bash speedrun.sh               # without workflow GRPO (operator workflows, five-tier rewards)
#   DEPTH=6 FORCE=1 WANDB_RUN=myrun COMPILE=0 DPO=1 bash speedrun.sh
#   screen -L -Logfile outs/screen.log -S speedrun bash speedrun.sh   # safe to run detached
#   SMOKE=1 bash speedrun.sh                  # GPU check: every stage of the gpu profile at tiny sizes, offline
#   SMOKE=1 DEVICE=cpu bash speedrun.sh       # its CPU dry run (the GPUs hidden); tests/test_smoke.py runs it
#
# Stages whose outputs exist are skipped unless FORCE=1; an interrupted training stage is resumed. Everything is
# logged to outs/speedrun.log; stage times go to outs/speedrun_times.tsv and the results of every stage to
# outs/report.md.
set -euo pipefail
cd "$(dirname "$0")"
# SMOKE=1: the gpu profile's stages, launch and flag shapes at tiny sizes on the synthetic world, offline, in a root
# of their own (SMOKE_ROOT, default outs/smoke: its outs/ and .cache/ stand for the repo's, so no stage's default
# path reaches a real run's files). Each stage runs under scripts.smoke_report's probe, and smoke.md tabulates
# what it ran on: device, bf16 autocast, torch.compile, the attention kernel, throughput, peak memory.
# DEVICE=cpu hides the GPUs: the CPU dry run. One process per node, SEEDS=1, DPO=1 unless set otherwise.
SMOKE="${SMOKE:-0}" REPO=$PWD VENV=.venv PROBE=""
if [ "$SMOKE" = 1 ]; then
    VENV=$REPO/.venv PROBE="-m scripts.smoke_report"
    mkdir -p "${SMOKE_ROOT:-outs/smoke}"
    cd "${SMOKE_ROOT:-outs/smoke}"
    [ "$PWD" != "$REPO" ] || { echo "SMOKE_ROOT must not be the repository itself" >&2; exit 2; }
    [ "${PROFILE:-gpu}" = gpu ] || { echo "SMOKE=1 checks the gpu profile; leave PROFILE unset or gpu" >&2; exit 2; }
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        WANDB_MODE=disabled SMOKE_STATS=$PWD/smoke_stats.jsonl
    [ "${DEVICE:-}" != cpu ] || export CUDA_VISIBLE_DEVICES=""
    PROFILE="${PROFILE:-gpu}" DEPTH="${DEPTH:-2}" NPROC_PER_NODE="${NPROC_PER_NODE:-1}" SEEDS="${SEEDS:-1}"
    DPO="${DPO:-1}" FORCE="${FORCE:-1}"
    rm -f outs/speedrun.log outs/speedrun_times.tsv "$SMOKE_STATS" smoke.md  # this run's alone
    # a failed stage still leaves smoke.md: the stages so far, and the failed one's exit status
    trap '[ $? = 0 ] || "$VENV"/bin/python -m scripts.smoke_report --summary || true' EXIT
fi
mkdir -p outs
exec > >(tee -a outs/speedrun.log) 2>&1

if [ -z "${PROFILE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PROFILE=gpu; else PROFILE=cpu; fi
fi
case "$PROFILE" in
    cpu) DEPTH="${DEPTH:-4}"; NPROC_PER_NODE="${NPROC_PER_NODE:-1}"; LANES="${LANES:-2}" ;;
    gpu) DEPTH="${DEPTH:-20}"; NPROC_PER_NODE="${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}"; LANES="${LANES:-1}" ;;
    *) echo "PROFILE must be cpu or gpu, got '$PROFILE'" >&2; exit 2 ;;
esac
COMPILE="${COMPILE:-1}"  # torch.compile for base and mid training; COMPILE=0 without a C++ compiler
SEEDS="${SEEDS:-3}"  # training runs per RLHF arm: the replicates behind the report's across-seed CI
# LANES: RLHF runs trained side by side, each on OMP_NUM_THREADS / LANES threads. A depth-4 model's small matrices
# keep two threads half idle: on 2 cores two one-thread GRPO runs make 1.5x the steps per second of one two-thread
# run. Their stage times overlap in speedrun_times.tsv.
export WANDB_RUN="${WANDB_RUN:-}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
echo "=== speedrun $(date '+%F %T'): profile=$PROFILE depth=$DEPTH nproc_per_node=$NPROC_PER_NODE$([ "$SMOKE" != 1 ] \
    || echo " smoke=1 root=$PWD") ==="

# set-up: our own venv; the CPU wheel of torch first, so nothing pulls a multi-GB CUDA build on a CPU machine
[ -x "$VENV"/bin/python ] || python3 -m venv "$VENV"
if ! "$VENV"/bin/python -c "import torch" 2>/dev/null; then
    if [ "$PROFILE" = cpu ]; then TORCH=torch==2.13.0; else TORCH="torch<=2.13.0"; fi
    "$VENV"/bin/pip install -q "$TORCH"
fi
# SMOKE=1 runs offline: the code comes from PYTHONPATH, so only missing dependencies send it to the registry
if [ "$SMOKE" != 1 ] || ! "$VENV"/bin/python -c "import tiktoken, tokenizers, datasets, matplotlib" 2>/dev/null; then
    (cd "$REPO" && "$VENV"/bin/pip install -q -e .)
fi
PY="$VENV/bin/python${PROBE:+ $PROBE}"

# run_stage NAME OUTPUT CMD...: skip when OUTPUT exists (unless FORCE=1), time it otherwise. A training stage that
# was interrupted (its directory holds optim.pt, the resume state; ckpt.pt appears only when it finishes) is resumed.
run_stage() {
    local name=$1 output=$2; shift 2
    if [ -e "$(dirname "$output")/optim.pt" ] && [ "${FORCE:-0}" != 1 ]; then
        echo "--- $name: resuming the interrupted run in $(dirname "$output")"
        set -- "$@" --resume=True
    elif [ -e "$output" ] && [ "${FORCE:-0}" != 1 ]; then
        echo "--- $name: $output exists, skipping (FORCE=1 reruns)"
        return
    fi
    echo "--- $name: $*"
    [ "$SMOKE" != 1 ] || export SMOKE_STAGE=$name
    local t0=$SECONDS
    "$@"
    printf '%s\t%ss\n' "$name" "$((SECONDS - t0))" | tee -a outs/speedrun_times.tsv
}
# training stages go through torchrun when there is more than one process per node
launch() {
    if [ "$NPROC_PER_NODE" -gt 1 ]; then
        "$VENV"/bin/torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" $PROBE -m "$@"
    else
        $PY -m "$@"
    fi
}

DENSITY_FLAGS="" DIVERSITY_FLAGS=""  # the scripts' defaults, except in the smoke run
if [ "$PROFILE" = cpu ]; then
    run_stage tokenizer outs/tokenizer/tokenizer.json $PY -m scripts.tok_train --vocab_size=1024
    run_stage base outs/base/ckpt.pt launch scripts.base_train -- --depth="$DEPTH" --seq_len=256 \
        --batch_rows=32 --device_batch_size=16 --max_steps=160 --eval_every=40 --eval_tokens=32768 --save_every=40 \
        --compile="$COMPILE"
    run_stage mid outs/mid/ckpt.pt launch scripts.mid_train -- --max_len=256 --batch_rows=32 \
        --device_batch_size=16 --max_steps=60 --compile="$COMPILE"
    SFT_FLAGS="--max_len=256 --batch_rows=32 --device_batch_size=16 --max_steps=100"
    run_stage pairs .cache/data/pairs_all.jsonl $PY -m scripts.kat_download_pairs --only synthetic
    EVAL_FLAGS="--tasks=world --limit=200"
    # the artifact and evasive pairs are learnt in tens of steps, the wrong facts take hundreds: drawing the wrong-fact
    # pairs 8x as often, 300 steps reach what 900 uniform steps did, at a third of the time (run E's SFT and pairs,
    # pairs_test accuracy: 300 uniform steps 0.860, 900 uniform 0.890, 300 with wrong=4 0.888, with wrong=8 0.894;
    # run H's own SFT and pairs: 0.871; with 12,000 pairs in run J: 0.907, see README "Run J"). Only the top 2 of the
    # 4 blocks train, in two thirds of the time, with wrong facts 16x as often at twice the learning rate: pairs_test
    # 0.914 and 0.902 on the SFT models of runs K and N, where the top 2 blocks at wrong=8 scored 0.909 and 0.886 and
    # all 4 0.9005 on K's (README "Runs M, N and O")
    RM_FLAGS="--max_steps=300 --kind_weights=wrong=16 --learning_rate=0.02 --train_layers=2 --max_len=64
        --device_batch_size=8 --eval_every=150"
    # 48 new tokens: the longest plain answers with two artifacts run past 32, and a truncated completion enters
    # no loss (at 32, 13-20% of them were truncated)
    GRPO_FLAGS="--max_steps=30 --eval_every=0 --save_every=10 --max_new_tokens=48"
    DPO_FLAGS="--max_len=64"
elif [ "$SMOKE" = 1 ]; then
    # the gpu profile's stages and flags at tiny sizes, the synthetic world in place of FineWeb, SmolTalk, the hub's
    # pairs and its eval tasks; context 256, as on the cpu profile, which STaR's and workflow GRPO's prompts need
    run_stage tokenizer outs/tokenizer/tokenizer.json $PY -m scripts.tok_train --vocab_size=512 --max_chars=300000
    run_stage base outs/base/ckpt.pt launch scripts.base_train -- --depth="$DEPTH" --num_docs=2000 --seq_len=256 \
        --batch_rows=8 --device_batch_size=4 --max_steps=4 --eval_every=2 --save_every=2 --eval_tokens=2048 \
        --sample_every=0 --compile="$COMPILE"
    run_stage mid outs/mid/ckpt.pt launch scripts.mid_train -- --max_len=256 --batch_rows=8 --device_batch_size=4 \
        --num_conversations=200 --val_conversations=16 --max_steps=4 --compile="$COMPILE"
    SFT_FLAGS="--max_len=256 --batch_rows=8 --device_batch_size=4 --num_conversations=200 --val_conversations=16
        --max_steps=4"
    run_stage pairs .cache/data/pairs_all.jsonl $PY -m scripts.kat_download_pairs --only synthetic \
        --max_per_source=400
    EVAL_FLAGS="--tasks=world --limit=8"
    RM_FLAGS="--max_steps=4 --batch_size_pairs=8 --device_batch_size=4 --max_len=64 --eval_every=0"
    GRPO_FLAGS="--max_steps=2 --prompts_per_step=2 --num_generations=4 --max_new_tokens=16 --device_batch_size=8
        --eval_every=0 --eval_prompts=4"
    DPO_FLAGS="--max_steps=4 --batch_size_pairs=8 --device_batch_size=4 --max_len=64 --eval_every=0 --eval_questions=4"
    DENSITY_FLAGS="--density_k=4"
    DIVERSITY_FLAGS="--num_prompts=4 --samples_per_prompt=2 --max_new_tokens=16 --num_resamples=100"
else
    run_stage tokenizer outs/tokenizer/tokenizer.json $PY -m scripts.tok_train --source=fineweb --num_shards=8 \
        --vocab_size=65536 --max_chars=2000000000
    run_stage base outs/base/ckpt.pt launch scripts.base_train -- --depth="$DEPTH" --source=fineweb \
        --num_shards=240 --seq_len=2048 --batch_rows=256 --device_batch_size=32 --eval_every=250 \
        --save_every=1000 --eval_tokens=10485760 --compile="$COMPILE"
    run_stage mid outs/mid/ckpt.pt launch scripts.mid_train -- --source=smoltalk --max_len=2048 \
        --batch_rows=256 --device_batch_size=32 --num_conversations=400000 --compile="$COMPILE"
    SFT_FLAGS="--source=smoltalk --max_len=2048 --batch_rows=32 --device_batch_size=4 --num_conversations=100000"
    run_stage pairs .cache/data/pairs_all.jsonl $PY -m scripts.kat_download_pairs
    EVAL_FLAGS="--tasks=arc_easy,arc_challenge,mmlu,gsm8k,humaneval --limit=500"
    RM_FLAGS="--max_steps=2000 --batch_size_pairs=128 --device_batch_size=8 --max_len=1024"
    GRPO_FLAGS="--max_steps=500 --prompts_per_step=64 --max_new_tokens=256 --device_batch_size=16"
    DPO_FLAGS="--max_steps=2000 --batch_size_pairs=64 --device_batch_size=4 --max_len=1024"
fi
run_stage sft outs/sft/ckpt.pt launch scripts.chat_sft -- $SFT_FLAGS
run_stage prompts .cache/data/prompts_all.jsonl $PY -m scripts.kat_make_prompts
run_stage eval_base outs/eval_base/results.json launch scripts.chat_eval -- --ckpt_path=outs/base $EVAL_FLAGS
run_stage eval_sft outs/eval_sft/results.json launch scripts.chat_eval -- --ckpt_path=outs/sft $EVAL_FLAGS

# RLHF: density weights, reward model, GRPO with density-aware and with uniform prompt sampling, SEEDS runs each,
# and the report that compares them. rlhf_arms METHOD SFT DENSITY OUT_PREFIX FLAGS... trains the runs of both arms,
# seed by seed (a stopped speedrun has whole seeds of both arms to compare), LANES runs at a time.
rlhf_arms() {
    local method=$1 sft=$2 density=$3 out=$4; shift 4
    local flags=("$@") seed arm run pids=()
    for seed in $(seq 1 "$SEEDS"); do
        for arm in density baseline; do
            run="$out${method}_${arm}_s$seed"
            local cmd=(run_stage "${run#outs/}" "$run/ckpt.pt" launch "scripts.kat_train_$method" --
                       --density_aware="$([ $arm = density ] && echo True || echo False)" --seed="$seed"
                       --sft_ckpt_path="$sft" --density_path="$density" --out_dir="$run" "${flags[@]}")
            if [ "$LANES" -gt 1 ]; then
                # side by side, each on its share of the threads, its lines prefixed with its name
                OMP_NUM_THREADS=$(( OMP_NUM_THREADS > LANES ? OMP_NUM_THREADS / LANES : 1 )) "${cmd[@]}" 2>&1 \
                    | sed -u "s|^|[${run#outs/}] |" &
                pids+=($!)
                if [ ${#pids[@]} -ge "$LANES" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
            else
                "${cmd[@]}"
            fi
        done
    done
    for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed run stops the speedrun here
}
run_stage density .cache/data/density.jsonl $PY -m scripts.kat_density $DENSITY_FLAGS
run_stage rm outs/rm/ckpt.pt launch scripts.kat_train_rm -- $RM_FLAGS
rlhf_arms grpo outs/sft .cache/data/density.jsonl outs/ $GRPO_FLAGS
run_stage diversity outs/diversity/diversity_report.md $PY -m scripts.kat_eval_diversity $DIVERSITY_FLAGS
if [ "${DPO:-0}" = 1 ]; then
    rlhf_arms dpo outs/sft .cache/data/density.jsonl outs/ $DPO_FLAGS
    run_stage diversity_dpo outs/diversity_dpo/diversity_report.md $PY -m scripts.kat_eval_diversity \
        --models="sft=outs/sft,density=outs/dpo_density_s*,baseline=outs/dpo_baseline_s*" --out_dir=outs/diversity_dpo \
        $DIVERSITY_FLAGS
fi

# AutoDeco (AUTODECO=0 skips it): heads on a frozen chat model that predict each token's temperature, trained with
# the analytic Min-P hinge, then compared with every fixed temperature and with MeanShift. On the cpu profile the
# chat model is an SFT of its own whose answers end in a free clause half the time ("..., as far as I know."), so one
# answer holds tokens with one right value and tokens where any of many is as good; the RLHF experiment's SFT model
# stays as it was. On the gpu profile the heads sit on outs/sft and learn from UltraChat.
if [ "${AUTODECO:-1}" = 1 ]; then
    if [ "$PROFILE" = cpu ]; then
        run_stage autodeco_sft outs/autodeco_sft/ckpt.pt launch scripts.chat_sft -- $SFT_FLAGS --free_clause_rate=0.5 \
            --out_dir=outs/autodeco_sft
        AUTODECO_BASE=outs/autodeco_sft AUTODECO_FLAGS=""
    elif [ "$SMOKE" = 1 ]; then  # the world's chats in place of UltraChat
        AUTODECO_BASE=outs/sft AUTODECO_FLAGS="--max_steps=4 --per_device_train_batch_size=4 --eval_samples=4
            --temp_diag_steps=2 --logging_steps=1"
    else
        AUTODECO_BASE=outs/sft AUTODECO_FLAGS="--dataset_name=HuggingFaceH4/ultrachat_200k --max_steps=2000"
    fi
    run_stage autodeco_init outs/autodeco_init/ckpt.pt $PY -m scripts.kat_construct_autodeco \
        --base_model_name_or_path="$AUTODECO_BASE" --output_dir=outs/autodeco_init
    run_stage autodeco outs/autodeco/ckpt.pt launch scripts.kat_train_autodeco -- \
        --model_name_or_path=outs/autodeco_init --output_dir=outs/autodeco $AUTODECO_FLAGS
    if [ "$PROFILE" = cpu ]; then
        run_stage autodeco_eval outs/autodeco_eval/autodeco_eval.md $PY -m scripts.kat_eval_autodeco
    else
        run_stage autodeco_eval outs/eval_autodeco/results.json launch scripts.chat_eval -- \
            --autodeco_path=outs/autodeco $EVAL_FLAGS
    fi
fi

# STaR (STAR=0 skips it): rationale self-training on multiple-choice questions in a low- and a high-resource
# language, trained together and evaluated apart against iteration 0. On the cpu profile the chat model is an SFT of
# its own, 200 steps with 6000 of the world's training questions answered with a rationale (10% in the second
# language): it states the right facts but maps them to the option's letter at about chance, which is what STaR's
# kept samples can teach (with 2000 questions and 100 steps a fifth of its second-language answers had no answer
# line and STaR's gains did not hold). The RLHF experiment's SFT model stays as it was. On the gpu profile:
# outs/sft on MMLU and its Yoruba translation, from the hub.
if [ "${STAR:-1}" = 1 ]; then
    if [ "$PROFILE" = cpu ]; then
        run_stage star_sft outs/star_sft/ckpt.pt launch scripts.chat_sft -- $SFT_FLAGS --mc_conversations=6000 \
            --max_steps=200 --out_dir=outs/star_sft
        STAR_FLAGS="--model_name=outs/star_sft --dataset_name=world_l2,world_en --num_train_questions=150
            --num_val_questions=100 --max_new_tokens=64 --max_epochs=3 --learning_rate=3e-4"
    elif [ "$SMOKE" = 1 ]; then  # the world's questions, in its second language and English, in place of MMLU's
        STAR_FLAGS="--model_name=outs/sft --dataset_name=world_l2,world_en --num_train_questions=4
            --num_val_questions=4 --samples_per_train_question=2 --max_new_tokens=16 --max_epochs=1 --lora_r=16
            --learning_rate=1e-4"
    else
        STAR_FLAGS="--model_name=outs/sft --dataset_name=mmlu_YO-NG,mmlu --num_train_questions=2000
            --num_val_questions=500 --max_new_tokens=256 --max_epochs=3 --lora_r=16 --learning_rate=1e-4"
    fi
    run_stage star outs/star/ckpt.pt launch scripts.kat_train_star -- $STAR_FLAGS --out_dir=outs/star
fi

# Workflow GRPO (WORKFLOW=0 skips it): a policy writes an operator workflow per task, an executor model runs it, and
# five-tier rewards train the policy; then the policy against fixed workflows (direct answer, chain of thought,
# 5-way self-consistency, Programmer, Programmer -> Test -> Revise) on held-out tasks. On the cpu profile one SFT of
# its own learns both roles on the synthetic world (workflows for math, QA and code; the operators' reply formats,
# with planted weaknesses each domain's right workflow repairs); the frozen copy is the executor. The gpu profile's
# models have not seen the world, and the workflow data is the world's: there, run the stage with an executor
# endpoint and a policy of your own (README, "Workflow GRPO"). The smoke run, on the world, runs it as the cpu profile
# does.
if [ "${WORKFLOW:-1}" = 1 ] && { [ "$PROFILE" = cpu ] || [ "$SMOKE" = 1 ]; }; then
    if [ "$SMOKE" = 1 ]; then
        WORKFLOW_SFT_FLAGS="--workflow_conversations=200 --max_steps=4"
        WORKFLOW_FLAGS="--max_steps=2 --eval_every=0 --rollout_batch_size=2 --num_train_tasks=50 --num_eval_tasks=3"
        WORKFLOW_EVAL_FLAGS="--limit=2 --num_resamples=100"
    else
        # micro-batches of 4 rows: the same training as 16 (the loss is normalised over the step), less padding on
        # these long, uneven rows (2 quiet cores, 25 steps: 1.04-1.13 s/step against 1.20-1.51 at 16)
        WORKFLOW_SFT_FLAGS="--workflow_conversations=8000 --max_steps=300 --device_batch_size=4"
        WORKFLOW_FLAGS="--max_steps=30 --eval_every=15" WORKFLOW_EVAL_FLAGS=""
    fi
    run_stage workflow_sft outs/workflow_sft/ckpt.pt launch scripts.chat_sft -- $SFT_FLAGS $WORKFLOW_SFT_FLAGS \
        --out_dir=outs/workflow_sft
    run_stage workflow outs/workflow/ckpt.pt launch scripts.kat_train_workflow -- --model_name=outs/workflow_sft \
        $WORKFLOW_FLAGS --out_dir=outs/workflow
    run_stage workflow_eval outs/workflow_eval/workflow_eval.md $PY -m scripts.kat_eval_workflows \
        --checkpoint=outs/workflow --out_dir=outs/workflow_eval $WORKFLOW_EVAL_FLAGS
fi

# The positive control (CONTROL=1): the same pipeline on an SFT model whose planted artifacts sit only on the rare
# clusters, base, mid, the pairs and the reward model reused. If density-aware sampling works as hypothesised, it
# removes those artifacts faster than uniform sampling; if the report cannot show that, the instrument is too weak.
# Everything goes under outs/control/ (its own report.md) and .cache/control/.
if [ "${CONTROL:-0}" = 1 ]; then
    run_stage control_sft outs/control/sft/ckpt.pt launch scripts.chat_sft -- $SFT_FLAGS --artifact_focus=rare \
        --artifact_rate=0.5 --out_dir=outs/control/sft
    run_stage control_density .cache/control/density.jsonl $PY -m scripts.kat_density \
        --sft_ckpt_path=outs/control/sft --density_path=.cache/control/density.jsonl \
        --test_density_path=.cache/control/density_test.jsonl --cache_dir=.cache/control \
        --report_dir=outs/control/density $DENSITY_FLAGS
    rlhf_arms grpo outs/control/sft .cache/control/density.jsonl outs/control/ $GRPO_FLAGS
    run_stage control_diversity outs/control/diversity/diversity_report.md $PY -m scripts.kat_eval_diversity \
        --models="sft=outs/control/sft,density=outs/control/grpo_density_s*,baseline=outs/control/grpo_baseline_s*" \
        --density_path=.cache/control/density_test.jsonl --out_dir=outs/control/diversity $DIVERSITY_FLAGS
fi

if [ "$SMOKE" = 1 ]; then
    "$VENV"/bin/python -m scripts.smoke_report --summary  # smoke.md; exit 1 when a stage left no record
    echo "=== smoke run done $(date '+%F %T'): see $PWD/smoke.md ==="
    exit 0
fi
echo "=== speedrun done $(date '+%F %T'): see outs/report.md and outs/diversity/diversity_report.md; chat with: $PY -m scripts.chat_cli --ckpt_path outs/sft ==="
