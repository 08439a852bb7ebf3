"""The contrastive loss keeps the codebook in use; masked prediction alone collapses it.

w2v-BERT's finding, reproduced at tiny scale on the synthetic corpus (the
longer curves are in benchmarks/RESULTS.md, from benchmarks/codebook_collapse.py).
"""

import numpy as np

from mslam_jax import gin_utils, pretrain_loss, train
from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.models.config import ModelConfig
from mslam_jax.train_config import TrainConfig


def _curves(tmp_path, name, *bindings, steps=80):
  gin_utils.parse_gin(['gin/pretrain_tiny_cpu.gin', 'gin/variants/w2v_bert.gin'],
                      ["DataConfig.source = 'synthetic'", 'BatchConfig.speech_batch_size = 4',
                       'BatchConfig.speech_frames = 160',
                       *bindings])
  _, history = train.train(
      ModelConfig(), pretrain_loss.LossConfig(), BatchConfig(),
      TrainConfig(model_dir=str(tmp_path / name), train_steps=steps, log_every=20, seed=0),
      log_initial=True)
  return (np.array([r['speech/code_perplexity'] for r in history]),
          np.array([r['speech/masked_prediction'] for r in history]))


def test_contrastive_keeps_codes_and_masked_prediction_alone_collapses(tmp_path):
  both, _ = _curves(tmp_path, 'both')
  mlm_only, mlm_loss = _curves(tmp_path, 'mlm', 'LossConfig.contrastive_weight = 0.0')
  assert both[0] == mlm_only[0]  # same seed, same initial quantizer
  # The random initial quantizer uses few of its 64 codes. The contrastive and
  # diversity losses spread the frames over many more ...
  assert both[-1] > 2 * both[0], both
  # ... while masked prediction alone leaves the codebook collapsed, and its
  # task becomes easy (loss far below its initial log(64)-like value).
  assert mlm_only.max() < 1.5 * mlm_only[0], mlm_only
  assert mlm_loss[-1] < 0.6 * mlm_loss[0], mlm_loss
  assert both[-1] > 2 * mlm_only[-1]
