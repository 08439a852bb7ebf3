"""The run summary: metrics rows after a resume, the headline line, the loss plot."""

import json

from mslam_jax import report


def test_resumed_steps_keep_the_last_row_and_the_plot_is_written(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w', encoding='utf-8') as f:
    for step, loss in ((10, 5.0), (20, 4.0), (20, 3.5), (30, 3.0)):  # step 20 logged twice
      f.write(json.dumps({'step': step, 'loss': loss, 'speech/contrastive': loss / 2}) + '\n')
  rows = report.read_metrics(path)
  assert [r['step'] for r in rows] == [10, 20, 30] and rows[1]['loss'] == 3.5
  png = report.plot_curves(rows, str(tmp_path / 'curves.png'))
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_downstream_line_names_the_run_and_its_chance_level():
  scores = {'evaluation': 'language_id', 'backbone': 'mslam', 'freeze_encoder': True,
            'test': {'accuracy': 0.5, 'classes': ['a', 'b', 'c', 'd']}}
  line = report.downstream_line(scores, 'language_id_random_init')
  assert line.startswith('language_id_random_init (mslam, frozen)')
  # An export's step tells a probe of the trained encoder from one of its random init.
  trained = dict(scores, backbone_origin={'step': 300, 'source': 'runs/demo'})
  assert report.downstream_line(trained, 'lid').startswith('lid (mslam at step 300, frozen) ')
  untrained = dict(scores, backbone_origin={'step': 0, 'source': 'random init, seed 0'},
                   freeze_encoder=False)
  assert report.downstream_line(untrained, 'lid').startswith(
      'lid (mslam at step 0 (untrained), fine-tuned) ')
  assert 'accuracy 0.500 (chance 0.250)' in line
  scores = dict(scores, test={'cer': 0.25})
  assert report.downstream_line(scores, 'x').endswith('CER 0.250')


def test_summary_lines_align_their_scores_past_the_longest_name(tmp_path, capsys):
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps({'step': s, 'loss': 9.0 - s}) + '\n' for s in (1, 2)), encoding='utf-8')
  test = {'accuracy': 0.5, 'classes': ['a', 'b']}
  folders = []
  for name, step in (('lid', 300), ('language_id_random_init', 0)):
    folder = tmp_path / name
    folder.mkdir()
    (folder / 'scores.json').write_text(json.dumps(
        {'evaluation': 'language_id', 'backbone': 'mslam', 'freeze_encoder': True,
         'backbone_origin': {'step': step, 'source': 'x'}, 'test': test}), encoding='utf-8')
    folders.append(f'--downstream={folder}')
  report.main([f'--model_dir={tmp_path}', *folders])
  lines = [line for line in capsys.readouterr().out.splitlines() if 'accuracy 0.500' in line]
  assert [line.index('accuracy') for line in lines] == [len(lines[1]) - len(
      'accuracy 0.500 (chance 0.500)')] * 2
  assert lines[1].startswith('  language_id_random_init (mslam at step 0 (untrained), frozen) ')
