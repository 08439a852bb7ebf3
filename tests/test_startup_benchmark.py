"""benchmarks/startup.py turns --variant gin bindings into the trainer's --gin flags."""

import pytest

import startup  # benchmarks/startup.py (tests/conftest.py puts benchmarks/ on the path)


def test_variant_bindings_become_gin_flags_split_at_the_first_equals_sign():
  assert startup.gin_flags([
      'TrainConfig.init_compiler_options = None',
      " TrainConfig.compiler_options = {'xla_backend_optimization_level': 1}",
      "MODEL_DIR='a=b'"]) == [
          '--gin.TrainConfig.init_compiler_options=None',
          "--gin.TrainConfig.compiler_options={'xla_backend_optimization_level': 1}",
          "--gin.MODEL_DIR='a=b'"]
  for bad in ('TrainConfig.seed', '= 3'):
    with pytest.raises(ValueError, match='NAME = VALUE'):
      startup.gin_flags([bad])


def test_stages_end_at_their_first_marker_line_and_durations_chain():
  lines = [(0.5, 'WARNING: noise\n'), (9.0, 'model_dir: /tmp/run  steps: 1\n'),
           (9.1, 'mesh: data=1\n'), (18.0, 'train step: 0.0038 TFLOP\n'),
           (49.0, 'step 1/1 | loss 10.6\n'), (49.5, 'step 1/1 again\n')]
  ends = startup.stage_ends(lines)
  assert ends == {'imports': 9.0, 'state': 18.0, 'step': 49.0}
  assert startup.stage_durations(ends) == pytest.approx({'imports': 9.0, 'state': 9.0,
                                                         'step': 31.0})


def test_a_missing_marker_ends_the_breakdown_there():
  ends = startup.stage_ends([(3.0, 'model_dir: x\n'), (40.0, 'step 1/1 | loss 1\n')])
  assert ends == {'imports': 3.0, 'step': 40.0}
  assert startup.stage_durations(ends) == {'imports': 3.0}
