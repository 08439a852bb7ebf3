#!/usr/bin/env bash
# The main command of the README: sets up .venv if needed, then pre-trains the
# tiny mSLAM on one CPU, on the embedded corpus (a few minutes). Extra arguments go to mslam_jax.train,
# e.g. --gin.TRAIN_STEPS=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
rm -rf runs/demo  # the demo starts afresh (a MODEL_DIR with checkpoints resumes)
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m mslam_jax.train --gin_file=gin/pretrain_tiny_cpu.gin \
  --gin.MODEL_DIR="'runs/demo'" "$@"
