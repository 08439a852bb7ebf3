"""The reproduction's bookkeeping: every unit once, resume after a failure, tables and plots."""

import dataclasses
import json
import os
import statistics

import numpy as np
import pytest

from mslam_jax import reproduce
from mslam_jax import trainer

BUDGET = dataclasses.replace(reproduce.QUICK, seeds=(0, 1, 2))


def _fake_scores(evaluation, backbone, seed):
  """Deterministic made-up test scores in the shape each evaluation writes."""
  value = 0.1 * (1 + list(reproduce.LABELS).index(backbone)) + 0.01 * seed
  per = {'en': value, 'ru': value / 2, 'el': value / 4}
  if evaluation == 'language_id':
    return {'accuracy': value, 'per_language': per, 'classes': ['en', 'ru', 'el']}
  if evaluation == 'ctc_probe':
    return {'cer': value, 'per_language': per}
  if evaluation == 'retrieval':
    return {'speech_to_text_recall@1': value, 'speech_to_text_recall@5': 2 * value,
            'text_to_speech_recall@1': value, 'chance@1': 0.01}
  return {'bleu': value, 'chrf': 3 * value, 'per_language': per,
          'text_zero_shot': {'bleu': value / 10}}


@pytest.fixture
def fake_units(monkeypatch):
  """Replaces pre-training, export and fine-tuning by recorders that write their outputs."""
  calls = []
  fail_at = {'unit': None, 'error': RuntimeError('killed')}

  def pretrain(output, variant, seed, budget):
    if ('pretrain', variant, seed) == fail_at['unit']:
      raise fail_at['error']
    calls.append(('pretrain', variant, seed))
    folder = os.path.join(output, 'pretrain', f'{variant}_seed{seed}')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
      for step in (10, 20):
        f.write(json.dumps({'step': step, 'loss': 5.0 - step / 10 - seed,
                            'speech/contrastive': 3.0, 'speech/masked_prediction': 4.0}) + '\n')

  def export(output, backbone, seed, budget):
    calls.append(('export', backbone, seed))

  def downstream(output, evaluation, backbone, seed, budget):
    unit = ('downstream', evaluation, backbone, seed)
    if unit == fail_at['unit']:
      raise fail_at['error']
    calls.append(unit)
    folder = os.path.join(output, 'downstream', evaluation, f'{backbone}_seed{seed}')
    os.makedirs(folder, exist_ok=True)
    test = _fake_scores(evaluation, backbone, seed)
    with open(os.path.join(folder, 'scores.json'), 'w', encoding='utf-8') as f:
      json.dump({'test': test}, f)

  monkeypatch.setattr(reproduce, 'pretrain', pretrain)
  monkeypatch.setattr(reproduce, 'export', export)
  monkeypatch.setattr(reproduce, 'downstream', downstream)
  return calls, fail_at


def test_plan_runs_every_variant_and_baseline_with_equal_seeds():
  units = reproduce.plan(BUDGET)
  pretrains = [u for u in units if u[0] == 'pretrain']
  assert sorted(pretrains) == sorted(('pretrain', v, s) for v in reproduce.VARIANTS
                                     for s in BUDGET.seeds)
  downstream = [u for u in units if u[0] == 'downstream']
  assert ('downstream', 'retrieval', 'logmel', 0) not in downstream  # no text input
  assert ('downstream', 'retrieval', 'w2v_bert', 0) not in downstream  # speech only
  assert ('downstream', 'ctc_probe', 'logmel_normalized', 2) in downstream
  # Normalised log-mel's mean+std pooling is constant: no language-ID run.
  assert ('downstream', 'language_id', 'logmel_normalized', 2) not in downstream
  assert len(set(units)) == len(units)


def test_a_preempted_unit_stops_the_reproduction_and_is_not_marked_done(fake_units, tmp_path,
                                                                        capsys):
  """SIGTERM inside a unit (trainer.Preempted after its save) ends the whole run with code
  0 and leaves the unit to the next sitting, which resumes it first."""
  calls, fail_at = fake_units
  unit = ('pretrain', 'mslam_tlm', 0)
  fail_at.update(unit=unit, error=trainer.Preempted(7, 40))
  with pytest.raises(SystemExit) as stop:
    reproduce.run_all(str(tmp_path), BUDGET)
  assert stop.value.code == 0
  assert not os.path.exists(reproduce._marker(str(tmp_path), unit))
  assert 'pretrain mslam_tlm 0: SIGTERM at step 7 of 40, saved' in capsys.readouterr().out
  first = list(calls)
  fail_at['unit'] = None
  calls.clear()
  reproduce.run_all(str(tmp_path), BUDGET)
  assert calls[0] == unit and sorted(first + calls) == sorted(reproduce.plan(BUDGET))


def test_a_killed_reproduction_resumes_where_it_stopped(fake_units, tmp_path):
  calls, fail_at = fake_units
  fail_at['unit'] = ('downstream', 'ctc_probe', 'mslam_tlm', 1)
  with pytest.raises(RuntimeError, match='killed'):
    reproduce.run_all(str(tmp_path), BUDGET)
  first = list(calls)
  fail_at['unit'] = None
  calls.clear()
  results = reproduce.run_all(str(tmp_path), BUDGET)
  units = reproduce.plan(BUDGET)
  assert calls[0] == ('downstream', 'ctc_probe', 'mslam_tlm', 1)  # the failed unit first
  assert sorted(first + calls) == sorted(units)  # every unit exactly once over both runs
  assert len(results['downstream']) == len([u for u in units if u[0] == 'downstream'])
  # The budget counts every unit once, from the markers, across both sittings.
  for unit in units:
    with open(reproduce._marker(str(tmp_path), unit), 'w', encoding='utf-8') as f:
      f.write('30.0\n' if unit[0] == 'pretrain' else '6.0\n')
  spent = reproduce.unit_minutes(str(tmp_path), units)
  pretrains = sum(u[0] == 'pretrain' for u in units)
  assert spent['total'] == pytest.approx(round(pretrains / 2 + (len(units) - pretrains) / 10, 1))
  assert spent['pretrain mslam_ctc'] == pytest.approx(0.5 * len(BUDGET.seeds))


def test_table_holds_mean_and_std_over_seeds(fake_units, tmp_path):
  results = reproduce.run_all(str(tmp_path), BUDGET)
  text = reproduce.table(results['downstream'], BUDGET)
  values = [_fake_scores('language_id', 'mslam_ctc', s)['accuracy'] for s in BUDGET.seeds]
  want = f'{statistics.fmean(values):.3g} ± {np.std(values, ddof=1):.2g}'
  row = next(line for line in text.splitlines() if line.startswith('| language_id | accuracy'))
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[2 + list(reproduce.VARIANTS).index('mslam_ctc')] == want
  group_row = next(line for line in text.splitlines()
                   if line.startswith('| language_id | Cyrillic'))
  ru = [_fake_scores('language_id', 'w2v_bert', s)['per_language']['ru'] for s in BUDGET.seeds]
  assert f'{statistics.fmean(ru):.3g}' in group_row
  curves = results['pretraining']['mslam_ctc']
  assert curves['step'] == [10, 20] and curves['loss'] == pytest.approx([3.0, 2.0])


def test_orderings_pair_runs_by_seed(fake_units, tmp_path):
  results = reproduce.run_all(str(tmp_path), BUDGET)
  text = reproduce.orderings(results['downstream'])
  rank = list(reproduce.LABELS).index
  # Fake scores rise with the backbone's position in LABELS: CTC (2) beats w2v-BERT (0) by
  # 0.2 in every seed, w2v-BERT loses to TLM (1) by 0.1 in every seed.
  ctc_w2v = next(line for line in text.splitlines()
                 if '| speech_translation | BLEU | mSLAM-CTC > w2v-BERT' in line)
  mean, std = (float(x) for x in ctc_w2v.split('|')[4].split('±'))
  assert mean == pytest.approx(0.1 * (rank('mslam_ctc') - rank('w2v_bert')))
  assert std == pytest.approx(0.0, abs=1e-9) and '3 of 3 seeds' in ctc_w2v
  w2v_tlm = next(line for line in text.splitlines()
                 if '| speech_translation | BLEU | w2v-BERT > mSLAM-TLM' in line)
  assert '0 of 3 seeds' in w2v_tlm
  # One seed's TLM result missing: that seed drops out of the pairing.
  rows = [r for r in results['downstream']
          if not (r['backbone'] == 'mslam_tlm' and r['seed'] == 0)]
  assert 'of 2 seeds' in next(line for line in reproduce.orderings(rows).splitlines()
                               if 'w2v-BERT > mSLAM-TLM' in line)


def test_plots_are_written(fake_units, tmp_path):
  results = reproduce.run_all(str(tmp_path), BUDGET)
  paths = reproduce.plots(str(tmp_path), results, BUDGET)
  assert [os.path.basename(p) for p in paths] == ['pretraining.png', 'downstream.png']
  for p in paths:
    with open(p, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  rows = results['downstream']
  assert reproduce._chance('language_id', 'accuracy', rows) == pytest.approx(1 / 3)
  assert reproduce._chance('retrieval', 'speech->text R@1', rows) == 0.01
  assert reproduce._chance('ctc_probe', 'CER', rows) is None


def test_curves_of_seeds_that_logged_no_common_step_are_empty(tmp_path):
  budget = dataclasses.replace(BUDGET, seeds=(0, 1))
  for seed, steps in ((0, (10, 20)), (1, (7,))):  # seed 1 stopped at step 7 and logged there
    folder = tmp_path / 'pretrain' / f'w2v_bert_seed{seed}'
    folder.mkdir(parents=True)
    (folder / 'metrics.jsonl').write_text(''.join(
        json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in steps), encoding='utf-8')
  assert reproduce.pretraining_curves(str(tmp_path), budget) == {'w2v_bert': {'step': []}}
