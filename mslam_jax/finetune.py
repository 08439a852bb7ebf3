"""Fine-tune and score an exported encoder on one downstream evaluation, from gin.

    python -m mslam_jax.finetune --gin_file=gin/downstream/language_id.gin \
        --gin.EXPORT_DIR="'exports/demo'" --gin.MODEL_DIR="'runs/demo_lid'"

Evaluations (DownstreamConfig.evaluation): language_id, asr (CTC; frozen: the
CTC probe), speech_translation (scored on speech and zero-shot on text),
multimodal_translation, retrieval (no training). Backbones: 'export' (an
export directory), or the log-mel baselines 'logmel' and 'logmel_normalized'.
Writes MODEL_DIR/metrics.jsonl, TensorBoard, checkpoints (a killed run
resumes) and MODEL_DIR/scores.json, and prints a summary.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from mslam_jax import console
from mslam_jax import host_memory

if __name__ == '__main__':
  host_memory.configure_on_cpu()  # first: it may re-execute the process (host_memory.py)
  console.quiet_unless_verbose()  # before jax and tensorflow load their loggers

import jax

from mslam_jax import gin_utils
from mslam_jax.downstream import engine
from mslam_jax.downstream import suite


def main(argv=None):
  gin_utils.parse_command_line(__doc__.splitlines()[0], argv)
  jax.config.update('jax_compilation_cache_dir',
                    jax.config.jax_compilation_cache_dir or '.jax_cache')
  scores = suite.run()
  print(suite.summary(scores), flush=True)
  print(f'scores: {engine.FinetuneConfig().model_dir}/scores.json', flush=True)


if __name__ == '__main__':
  main()
