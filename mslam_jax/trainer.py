"""Train state and the jitted pre-training step (single device for now).

The pjit-sharded, checkpointed, multi-host trainer comes with the trainer
issue; this module holds the pieces it will keep: the state, the step, and
the metric logging.
"""

import itertools
import json
import os
import time
from typing import Any, Callable, Dict, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mslam_jax import pretrain_loss
from mslam_jax.models.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_train_state(rng, batch, optimizer: optax.GradientTransformation, *,
                     model_config: ModelConfig, loss_config: pretrain_loss.LossConfig):
  params = pretrain_loss.init_params(rng, batch, model_config=model_config,
                                     loss_config=loss_config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def make_train_step(optimizer: optax.GradientTransformation, *,
                    model_config: ModelConfig,
                    loss_config: pretrain_loss.LossConfig) -> Callable:
  """(state, batch, rng) -> (state, metrics): one Adam step on the total loss."""

  def loss_fn(params, batch, rng, step):
    return pretrain_loss.pretrain_loss(params, batch, rng, step, model_config=model_config,
                                       loss_config=loss_config)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, state.step)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(*, model_config: ModelConfig,
                   loss_config: pretrain_loss.LossConfig) -> Callable:
  """(params, batch, rng) -> metrics without dropout or Gumbel noise."""

  def eval_step(params, batch, rng):
    _, metrics = pretrain_loss.pretrain_loss(params, batch, rng, 0, model_config=model_config,
                                             loss_config=loss_config, deterministic=True)
    return metrics

  return eval_step


class MetricsWriter:
  """Appends one JSON line per logged step to MODEL_DIR/metrics.jsonl and prints it."""

  def __init__(self, model_dir: str):
    os.makedirs(model_dir, exist_ok=True)
    self.path = os.path.join(model_dir, 'metrics.jsonl')

  def write(self, step: int, metrics: Dict[str, Any]) -> Dict[str, float]:
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')
    terms = ' '.join(f'{k}={record[k]:.4g}' for k in sorted(record)
                     if k.endswith(('loss', 'contrastive', 'masked_prediction', 'span_mlm',
                                    'ctc', 'code_perplexity', 'step_time_s')))
    print(f'step {record["step"]:>6d} {terms}', flush=True)
    return record


def run(state: TrainState, train_step: Callable, batches: Iterator, rng, *,
        num_steps: int, log_every: int, writer: MetricsWriter, eval_step: Callable = None):
  """Runs `num_steps` steps; logs the mean step time since the previous log.

  With `eval_step` ((params, batch, rng) -> metrics), the metrics of the
  initial parameters are logged first, as step 0, on the first batch.
  """
  step_fn = jax.jit(train_step, donate_argnums=0)
  history = []
  if eval_step is not None:
    batch = next(batches)
    history.append(writer.write(int(state.step), jax.device_get(
        jax.jit(eval_step)(state.params, batch, rng))))
    batches = itertools.chain([batch], batches)
  last_time, last_step = time.perf_counter(), int(state.step)
  for _ in range(num_steps):
    state, metrics = step_fn(state, next(batches), rng)
    step = int(state.step)
    if step % log_every == 0 or step == num_steps:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      metrics['step_time_s'] = (now - last_time) / max(step - last_step, 1)
      last_time, last_step = now, step
      history.append(writer.write(step, metrics))
  return state, history
