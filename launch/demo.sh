#!/usr/bin/env bash
# The main command of the README: sets up .venv if needed, then, on one CPU and the
# embedded corpus (about 2 minutes on 2 cores once .venv exists: 107 s with a cold
# compilation cache on a 2-core AVX-512 EPYC, 2026-12-05):
#   1. pre-trains the tiny mSLAM           -> runs/demo (checkpoints, metrics.jsonl)
#   2. exports its encoder                 -> runs/demo/export
#   3. a language-ID probe on the frozen encoder, and the same probe on the untrained
#      encoder for comparison              -> runs/demo/language_id{,_random_init}
#   4. prints a summary table and writes runs/demo/loss_curves.png
# Extra arguments go to mslam_jax.train, e.g. --gin.TRAIN_STEPS=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
rm -rf runs/demo  # the demo starts afresh (a MODEL_DIR with checkpoints resumes)
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"

PY=.venv/bin/python
echo "== 1/4 pre-training"
$PY -m mslam_jax.train --gin_file=gin/pretrain_tiny_cpu.gin --gin.MODEL_DIR="'runs/demo'" "$@"
echo "== 2/4 export"
$PY -m mslam_jax.export --model_dir=runs/demo --output=runs/demo/export
$PY -m mslam_jax.export --random_init --gin_file=gin/pretrain_tiny_cpu.gin \
  --output=runs/demo/export_random_init
echo "== 3/4 language-ID probe (frozen encoder + linear classifier)"
for which in "" _random_init; do
  $PY -m mslam_jax.finetune --gin_file=gin/downstream/language_id.gin \
    --gin_file=gin/downstream/tiny.gin --gin.FinetuneConfig.freeze_encoder=True \
    --gin.EXPORT_DIR="'runs/demo/export$which'" --gin.MODEL_DIR="'runs/demo/language_id$which'"
done
echo "== 4/4 summary"
$PY -m mslam_jax.report --model_dir=runs/demo --downstream=runs/demo/language_id \
  --downstream=runs/demo/language_id_random_init
