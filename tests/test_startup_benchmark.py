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
