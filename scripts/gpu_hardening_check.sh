#!/usr/bin/env bash
# One device call for the hardening checks on a GPU host (the H200 image: torch 2.11, no vLLM):
#   1. graphed LoRA gradients with three micro-batches, two replaying one bucket (pytorch#181723),
#      fixed, then the bug reproduced with --grads-to-none, then the single-micro-batch step;
#   2. the varlen gate: torch's varlen kernel hidden, a LoRA job still trains (eagerly, warned);
#   3. the runner's job path (scripts/gpu_job_check.sh) with a 2,048-token budget.
# Usage: scripts/gpu_hardening_check.sh OUTDIR   (service wheels on PYTHONPATH: fetch-wheels.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_hardening_check.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
run() { local name=$1; shift; echo "== $name: $*"; "$@" > "$out/$name.txt" 2>&1; echo "   exit $?"; tail -n 14 "$out/$name.txt"; }
run grad16 $py bench/grad_check.py --model 7b --samples-per-step 16 --token-budget 2048
run grad16-none $py bench/grad_check.py --model 7b --samples-per-step 16 --token-budget 2048 --grads-to-none
run grad4 $py bench/grad_check.py --model 7b
run varlen $py - <<'PY'
import logging, tempfile
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import torch
from runner.train import attention
attention._varlen_attn = None  # a torch without the kernel, as the old image had
from runner.config import parse_train_args
from runner.models import load_tokenizer
from runner.tiny_model import build_tiny_model
from runner.train.recipe import TrainSpec, train
from core.protocol import Message, render_training_example
model = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
tok = load_tokenizer(model)
rows = [[Message("user", f"标题：{w}新闻"), Message("assistant", l)] for w, l in
        [("球队", "体育"), ("股价", "股票"), ("楼盘", "房产"), ("高考", "教育")] * 4]
spec = TrainSpec(config=parse_train_args(["epochs=3", "bs=4", "ga=1", "lr=1e-3"]),
                 examples=[render_training_example(tok, r) for r in rows], base=model,
                 cuda_graphs=True)
result = train(spec)
print("varlen hidden: trained", result.step, "steps on", torch.cuda.get_device_name(),
      "losses", [round(x, 4) for x in result.losses[:3]], "...", round(result.losses[-1], 4))
PY
run job env RUNNER_TOKEN_BUDGET=2048 bash scripts/gpu_job_check.sh /tmp/gpu-job
