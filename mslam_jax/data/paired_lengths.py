"""How many paired examples the length limits would skip, measured at start-up.

Paired examples cannot be cropped (the transcript would no longer match the
audio), so one longer than `BatchConfig.paired_frames` log-mel frames or
`BatchConfig.paired_text_length` characters is skipped. The policy that keeps
real corpora usable is a limit that fits them: the paper-size configs allow
20 s and 400 characters (real paired corpora run 10-20 s; the memory this
costs is in benchmarks/RESULTS.md), and this survey reads the first records of
every paired task before training, so a limit that would still skip many
examples is reported at start instead of only in the end-of-run report.

The survey reads audio headers only (soundfile), not samples: a few hundred
records per task take well under a second.
"""

import dataclasses
import io
from typing import List, Optional, Sequence

import numpy as np
import seqio
import soundfile as sf

from mslam_jax.data import audio
from mslam_jax.data import vocabulary

# Share of surveyed examples over a limit above which start-up prints a
# warning (ours: 1%, a share that changes the paired data noticeably).
WARN_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class TaskLengths:
  """Lengths of the first `checked` readable records of one paired task.

  Attributes:
    task: the task name.
    frames: log-mel frames of each record's audio (at FeatureConfig's hop).
    chars: characters of each record's normalised transcript.
  """
  task: str
  frames: np.ndarray
  chars: np.ndarray

  @property
  def checked(self) -> int:
    return len(self.frames)

  def over(self, frame_limit: int, char_limit: int) -> int:
    """Records that a limit skips."""
    return int(np.sum((self.frames > frame_limit) | (self.chars > char_limit)))


def _audio_frames(data: bytes, config: audio.FeatureConfig) -> Optional[int]:
  """Log-mel frames of encoded audio from its header; None if unreadable."""
  try:
    info = sf.info(io.BytesIO(data))
  except Exception:  # pylint: disable=broad-except
    return None  # counted by the pipeline's bad-input report, not here
  samples = int(round(info.frames * config.sample_rate / info.samplerate))
  return audio.num_frames(samples, config)


def survey(task_names: Sequence[str], *, split: str = 'train',
           records_per_task: int = 256) -> List[TaskLengths]:
  """Audio and transcript lengths of the first records of each paired task."""
  config = audio.FeatureConfig()
  out = []
  for name in task_names:
    source = seqio.get_mixture_or_task(name).source
    frames, chars = [], []
    for record in source.get_dataset(split, shuffle=False).take(records_per_task).as_numpy_iterator():
      n = _audio_frames(record['audio'], config)
      if n is None:
        continue
      frames.append(n)
      text = record['transcript'].decode('utf-8', errors='replace')
      chars.append(len(vocabulary.normalize_text(text)))
    out.append(TaskLengths(name, np.asarray(frames, np.int64), np.asarray(chars, np.int64)))
  return out


def warning(lengths: Sequence[TaskLengths], frame_limit: int, char_limit: int,
            warn_share: float = WARN_SHARE) -> Optional[str]:
  """A few lines for the console when over `warn_share` of the surveyed records are
  over a limit, naming the tasks, the limits that would keep 99%, and the fix; else None."""
  checked = sum(t.checked for t in lengths)
  over = sum(t.over(frame_limit, char_limit) for t in lengths)
  if not checked or over / checked <= warn_share:
    return None
  frames = np.concatenate([t.frames for t in lengths])
  chars = np.concatenate([t.chars for t in lengths])
  worst = sorted(((t.over(frame_limit, char_limit) / max(t.checked, 1), t.task)
                  for t in lengths), reverse=True)
  tasks = ', '.join(f'{name} {share:.0%}' for share, name in worst[:5] if share > 0)
  # Raise a limit to the 99th percentile where it is below; never lower one.
  p99_frames, p99_chars = (max(int(np.ceil(np.percentile(x, 99))), limit)
                           for x, limit in ((frames, frame_limit), (chars, char_limit)))
  seconds = frame_limit * audio.FeatureConfig().hop_ms / 1000
  return (f'paired data: {over} of {checked} surveyed examples ({over / checked:.1%}) are '
          f'longer than BatchConfig.paired_frames={frame_limit} '
          f'({seconds:.1f} s) or paired_text_length={char_limit} characters and '
          f'will be skipped ({tasks}).\n'
          f'  To keep 99%: --gin.BatchConfig.paired_frames={p99_frames} '
          f'--gin.BatchConfig.paired_text_length={p99_chars} (check the memory with '
          'python -m mslam_jax.compile), or shorten the examples in the corpus.')
