"""Export a pre-trained encoder: weights, config, vocabulary and a manifest.

    python -m mslam_jax.export --model_dir=runs/demo --output=exports/demo [--step=N]
    python -m mslam_jax.export --random_init --gin_file=gin/pretrain_tiny_cpu.gin \
        --output=exports/random   # the same encoder untrained (a baseline)

The export holds what downstream use needs and nothing else:

    OUTPUT/params/          orbax (tensorstore) checkpoint of the encoder: frontend,
                            speech_layers, shared_layers, text_embedding; no optimizer
                            state and no pre-training heads; loads without running code
    OUTPUT/config.gin       the pre-training run's gin config (for reference and re-use)
    OUTPUT/vocab.txt        the character vocabulary the run trained with
    OUTPUT/manifest.json    format version, ModelConfig and FeatureConfig fields, step,
                            parameter count, source

`mslam_jax.load_encoder(OUTPUT)` reads it back (mslam_jax/encoder.py) from the
manifest alone: no gin parsing, so it works in any process. A pre-training run
writes its config to MODEL_DIR/config.gin at start (mslam_jax/train.py); export
reads the model and feature settings from there.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from mslam_jax import console

if __name__ == '__main__':
  console.quiet_unless_verbose()  # before jax and tensorflow load their loggers

import argparse
import dataclasses
import json
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mslam_jax import gin_utils
from mslam_jax import paths
from mslam_jax.data import vocabulary

FORMAT_VERSION = 1
# The parameter subtrees of MSLAM that make the encoder (mslam_jax/models/mslam.py);
# the quantizer, projections and heads only serve pre-training. A speech-only
# model (the w2v-BERT variant) has no text embedding: its export has no text input.
ENCODER_PARTS = ('frontend', 'speech_layers', 'shared_layers', 'text_embedding')
REQUIRED_PARTS = ('frontend', 'speech_layers', 'shared_layers')
MANIFEST = 'manifest.json'
CONFIG = 'config.gin'
VOCAB = 'vocab.txt'
PARAMS = 'params'


def encoder_params(params: Dict[str, Any]) -> Dict[str, Any]:
  """The encoder's subtrees of MSLAM's parameters (ENCODER_PARTS that are present)."""
  missing = [p for p in REQUIRED_PARTS if p not in params]
  if missing:
    raise ValueError(f'parameters lack the encoder parts {missing}; expected an MSLAM '
                     'parameter tree with ' + ', '.join(ENCODER_PARTS))
  return {p: params[p] for p in ENCODER_PARTS if p in params}


def _configs_from_gin():
  """(ModelConfig, FeatureConfig, vocabulary path) of the gin config parsed now.

  Raises ValueError when the configs disagree on num_mel_bins.
  """
  from mslam_jax.data import audio  # pylint: disable=g-import-not-at-top
  from mslam_jax.data import batch_spec  # pylint: disable=g-import-not-at-top
  from mslam_jax.data import sampler  # pylint: disable=g-import-not-at-top
  from mslam_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  model_config, feature_config = ModelConfig(), audio.FeatureConfig()
  batch_spec.check_num_mel_bins(model_config, batch_spec.BatchConfig(), feature_config)
  data_config = sampler.DataConfig()
  return model_config, feature_config, sampler.resolve_path(data_config.vocabulary_path)


def _abstract_params(model_config, batch_config, loss_config):
  from mslam_jax import pretrain_loss  # pylint: disable=g-import-not-at-top
  from mslam_jax import trainer  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  batch = trainer.init_batch(batch_config, loss_config.parts)
  return nn.unbox(jax.eval_shape(
      lambda r: pretrain_loss.init_params(r, batch, model_config=model_config,
                                          loss_config=loss_config), jax.random.key(0)))


def restore_params(model_dir: str, step: Optional[int] = None):
  """(encoder params as numpy-backed jax arrays on one device, step) from a run's checkpoint.

  Only the parameters are read (orbax partial restore): the optimizer state,
  twice the parameters' size under Adam, stays on disk.
  """
  from mslam_jax import pretrain_loss  # pylint: disable=g-import-not-at-top
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=g-import-not-at-top
  from mslam_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  directory = paths.path(model_dir) / 'checkpoints'
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: train first, or give the '
                            'MODEL_DIR of a run that saved one (TrainConfig.save_every)')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'no checkpoint of step {step} in {directory}; saved steps: '
                            f'{sorted(steps)}')
  abstract = _abstract_params(ModelConfig(), BatchConfig(), pretrain_loss.LossConfig())
  device = jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  target = {'params': jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)}
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  manager.close()
  return encoder_params(restored['params']['params']), step  # TrainState.params holds flax variables


def random_params(seed: int):
  """Untrained encoder parameters of the gin config parsed now (the random-init baseline)."""
  from mslam_jax import pretrain_loss  # pylint: disable=g-import-not-at-top
  from mslam_jax import trainer  # pylint: disable=g-import-not-at-top
  from mslam_jax.data.batch_spec import BatchConfig  # pylint: disable=g-import-not-at-top
  from mslam_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from mslam_jax.train_config import TrainConfig  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  loss_config = pretrain_loss.LossConfig()
  batch = trainer.init_batch(BatchConfig(), loss_config.parts)
  # Compiled as the run's own initialisation is (TrainConfig.init_compiler_options).
  params = nn.unbox(jax.jit(
      lambda r: pretrain_loss.init_params(r, batch, model_config=ModelConfig(),
                                          loss_config=loss_config),
      compiler_options=TrainConfig().init_compiler_options)(jax.random.key(seed)))
  return encoder_params(params['params'])


def write_export(output: str, params: Dict[str, Any], *, model_config, feature_config,
                 vocabulary_path: str, config_text: str, step: int, source: str) -> epath.Path:
  """Writes OUTPUT/{params,config.gin,vocab.txt,manifest.json}; replaces an older export."""
  out = paths.path(output)
  if (out / PARAMS).exists():
    (out / PARAMS).rmtree()
  out.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / PARAMS, params)
  checkpointer.wait_until_finished()
  (out / CONFIG).write_text(config_text)
  vocab_text = epath.Path(vocabulary_path).read_text()
  (out / VOCAB).write_text(vocab_text)
  vocab_size = vocabulary.CharacterVocabulary.load(str(out / VOCAB)).vocab_size
  num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  manifest = {
      'format_version': FORMAT_VERSION,
      'model': dataclasses.asdict(model_config),
      'features': dataclasses.asdict(feature_config),
      'vocab_size': vocab_size,
      'step': int(step),
      'num_params': num_params,
      'parts': sorted(params),
      'source': source,
      'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
  return out


def export(model_dir: str, output: str, step: Optional[int] = None) -> epath.Path:
  """Exports the encoder of `model_dir`'s checkpoint `step` (default: the latest)."""
  config_path = epath.Path(model_dir) / CONFIG
  if not config_path.exists():
    raise FileNotFoundError(
        f'{config_path} not found: runs write it at start since this version. For an older '
        'run, copy the gin files it was started with into one file there (gin/ + your '
        '--gin.X=Y flags).')
  config_text = config_path.read_text()
  gin_utils.parse_gin([], [config_text])
  model_config, feature_config, vocabulary_path = _configs_from_gin()
  params, step = restore_params(model_dir, step)
  return write_export(output, params, model_config=model_config,
                      feature_config=feature_config, vocabulary_path=vocabulary_path,
                      config_text=config_text, step=step, source=str(model_dir))


def export_random(output: str, seed: int = 0) -> epath.Path:
  """Exports an untrained encoder of the gin config parsed now (step 0)."""
  import gin  # pylint: disable=g-import-not-at-top
  model_config, feature_config, vocabulary_path = _configs_from_gin()
  return write_export(output, random_params(seed), model_config=model_config,
                      feature_config=feature_config, vocabulary_path=vocabulary_path,
                      config_text=gin.config_str(), step=0, source=f'random init, seed {seed}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model_dir', help='the pre-training run (MODEL_DIR)')
  parser.add_argument('--output', required=True, help='export directory (created)')
  parser.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
  parser.add_argument('--random_init', action='store_true',
                      help='export the untrained encoder of --gin_file instead (a baseline)')
  parser.add_argument('--seed', type=int, default=0, help='parameter seed for --random_init')
  parser.add_argument('--verbose', action='store_true',
                      help='keep the start-up logs of jax, XLA and TensorFlow')
  parser.add_argument('--gin_file', action='append', default=[],
                      help='with --random_init: the experiment gin file(s)')
  import sys  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings, rest = gin_utils.split_gin_flags(argv)
  args = parser.parse_args(rest)
  if args.random_init:
    if not args.gin_file:
      parser.error('--random_init needs --gin_file (the model to initialise)')
    # Writes to --output only: a pod file's REQUIRED MODEL_DIR need not be given.
    gin_utils.parse_gin(args.gin_file, bindings, writes_model_dir=False)
    print(f'initialising the encoder of {" ".join(args.gin_file)} (seed {args.seed})...',
          flush=True)
    out = export_random(args.output, args.seed)
  else:
    if not args.model_dir:
      parser.error('give --model_dir (or --random_init with --gin_file)')
    # A line while it works: a large model's checkpoint takes a while to read.
    which = 'the latest checkpoint' if args.step is None else f'the checkpoint of step {args.step}'
    print(f'reading the encoder parameters of {args.model_dir} ({which})...', flush=True)
    out = export(args.model_dir, args.output, args.step)
  manifest = json.loads((out / MANIFEST).read_text())
  print(f'exported {manifest["num_params"]:,} encoder parameters (step {manifest["step"]}) '
        f'to {out}', flush=True)


if __name__ == '__main__':
  main()
