"""mslam_jax: joint speech+text pre-training (mSLAM) in JAX/Flax.

Install with the tested pins:  pip install -c constraints.txt -e '.[test]'
"""

import setuptools

setuptools.setup(
    name='mslam_jax',
    version='0.1.0',
    description='mSLAM: multilingual joint speech and text pre-training in JAX/Flax',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['mslam_jax', 'mslam_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10,<0.11',
        'flax>=0.12,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12,<0.13',
        # orbax imports it for any gs:// checkpoint directory but does not declare it
        'google-cloud-storage>=3.17,<4',
        'seqio>=0.0.20',
        'grain>=0.2.18',  # index-based global order of the pre-training sampler
        'tensorflow>=2.21,<2.22',
        'tensorflow-datasets>=4.9',
        'gin-config>=0.5',
        'numpy>=2.0',
        'librosa>=0.11',
        'soundfile>=0.12',  # audio decoding (WAV, FLAC, OGG) in the input pipeline
        'soxr>=0.3',  # resampling to 16 kHz
        'sacrebleu>=2.4',
        'jiwer>=4.0',  # WER/CER of the ASR evaluations
        'matplotlib>=3.8',  # the reproduction's and the demo's plots
        'tqdm',
        'tensorboard',
        # The host allocator on CPU (mslam_jax/host_memory.py): XLA:CPU's per-step
        # temporary buffer is reused instead of page-faulted in afresh at every step.
        'cmeel-mimalloc>=3.4; sys_platform == "linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        # importlib_resources: TFDS needs it to prepare a dataset (the TFDS source test does).
        'test': ['pytest>=8', 'pytest-xdist>=3', 'importlib_resources'],
        # Compiling for a named TPU slice on any machine (mslam_jax.compile --topology);
        # not in the default install: libtpu probes for a TPU at every jax start-up.
        'tpu': ['libtpu'],
        # The side-by-side benchmark's peer (benchmarks/side_by_side.py): Hugging Face's
        # Wav2Vec2-BERT on PyTorch. Never needed to train, test or export.
        'bench': ['torch>=2.9', 'transformers>=5'],
    },
)
