"""benchmarks/gpu_profile.py: GPU kernels of a perfetto trace, by kind and by the HLO op they run."""

import pytest

import gpu_profile  # benchmarks/ (tests/conftest.py puts it on the path)

# Kernel names as XLA:GPU and cuBLAS name them in an H200 trace of the 0.6B stack step.
SOURCES = {
    'loop_add_fusion.3': 'jit(train_step)/jvp(ConformerStack)/layers/conv/add',
    'gemm_fusion_dot.8': 'jit(train_step)/transpose(jvp(ConformerStack))/layers/ffn_start/wi/dot_general',
    'wrapped_concatenate': 'jit(train_step)/transpose(jvp(ConformerStack))/layers/conv/concatenate',
    'fusion': '',
}


@pytest.mark.parametrize('kernel, kind', [
    ('nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT', 'matmul'),
    ('gemm_fusion_dot_8', 'matmul'),
    ('cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8', 'matmul'),
    ('memcpy128', 'copy'),
    ('wrapped_concatenate', 'copy'),
    ('loop_dynamic_update_slice_fusion_2', 'copy'),
    ('loop_add_fusion_3', 'other'),
    ('input_multiply_reduce_fusion_1', 'other'),
])
def test_kernel_kind(kernel, kind):
  assert gpu_profile.kernel_kind(kernel) == kind


def test_kernels_map_to_the_hlo_instructions_they_are_named_after():
  assert gpu_profile.hlo_instruction('loop_add_fusion_3', SOURCES) == 'loop_add_fusion.3'
  assert gpu_profile.hlo_instruction('gemm_fusion_dot_8', SOURCES) == 'gemm_fusion_dot.8'
  assert gpu_profile.hlo_instruction('wrapped_concatenate', SOURCES) == 'wrapped_concatenate'
  assert gpu_profile.hlo_instruction('loop_add_fusion_4', SOURCES) is None
  assert gpu_profile.hlo_instruction('nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT', SOURCES) is None


def _event(pid, name, ts, dur):
  return {'ph': 'X', 'pid': pid, 'tid': 14, 'ts': ts, 'dur': dur, 'name': name}


def test_summarize_sums_gpu_kernels_per_step_by_kind_and_part():
  events = [
      {'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'pid': 7, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
      _event(7, 'loop_add_fusion_3', 0.0, 9000.0),  # host side: not a kernel
      # two steps of: a cuBLAS product, a Triton GEMM, a fusion, a concatenation
      _event(1, 'nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT', 100.0, 400.0),
      _event(1, 'gemm_fusion_dot_8', 500.0, 200.0),
      _event(1, 'loop_add_fusion_3', 700.0, 60.0),
      _event(1, 'wrapped_concatenate', 760.0, 40.0),
      _event(1, 'nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT', 1100.0, 400.0),
      _event(1, 'gemm_fusion_dot_8', 1500.0, 200.0),
      _event(1, 'loop_add_fusion_3', 1700.0, 60.0),
      _event(1, 'wrapped_concatenate', 1760.0, 40.0),
  ]
  by_kind, by_part, span = gpu_profile.summarize(events, SOURCES, steps=2)
  assert by_kind == pytest.approx({'matmul': 0.6, 'other': 0.06, 'copy': 0.04})
  assert span == pytest.approx((1800.0 - 100.0) / 1e3 / 2)
  assert by_part[('matmul', '', '(nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT)')] == pytest.approx(0.4)
  assert by_part[('matmul', 'backward', 'layers/ffn_start/wi/dot_general')] == pytest.approx(0.2)
  assert by_part[('other', 'forward', 'layers/conv/add')] == pytest.approx(0.06)
  assert by_part[('copy', 'backward', 'layers/conv/concatenate')] == pytest.approx(0.04)
  assert sum(by_part.values()) == pytest.approx(sum(by_kind.values()))
