"""Tests of the embedded-corpus builder: catalog filters, .mo and fortune reading,
the multi-way held-out split, the downstream splits, synthesis and a miniature
end-to-end build.

No network. Tests that speak need espeak-ng and are skipped without it. The
.mo files are written here in the GNU binary format by `write_mo`, so reading
is checked against an independent writer rather than against itself.
"""

import dataclasses
import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf

from mslam_jax.corpus import build
from mslam_jax.corpus import catalogs
from mslam_jax.corpus import synthesis
from mslam_jax.data.vocabulary import CharacterVocabulary
from mslam_jax.data.vocabulary import normalize_text

needs_espeak = pytest.mark.skipif(shutil.which('espeak-ng') is None,
                                  reason='espeak-ng is not installed')


def write_mo(path, entries, charset='UTF-8'):
  """A GNU .mo file (little-endian, revision 0, no hash table) of msgid -> msgstr.

  Plural entries are written as 'one\\0many' on both sides, msgctxt as
  'context\\x04msgid', as msgfmt does. The header entry is added.
  """
  entries = dict(entries)
  entries[''] = f'Content-Type: text/plain; charset={charset}\nMIME-Version: 1.0\n'
  keys = sorted(entries, key=lambda k: k.encode(charset))
  ids = [k.encode(charset) for k in keys]
  strs = [entries[k].encode(charset) for k in keys]
  n = len(keys)
  originals_at = 7 * 4
  translations_at = originals_at + 8 * n
  data_at = translations_at + 8 * n
  data, tables = b'', []
  for strings in (ids, strs):
    table = b''
    for s in strings:
      table += struct.pack('<2I', len(s), data_at + len(data))
      data += s + b'\0'
    tables.append(table)
  header = struct.pack('<7I', 0x950412de, 0, n, originals_at, translations_at, 0, 0)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(header + tables[0] + tables[1] + data)


# --- pair filter: one case per drop_reason rule ------------------------------

@pytest.mark.parametrize('english, translation, expected', [
    ('Open the selected file', 'Die gewählte Datei öffnen', None),
    (('One file', 0), 'Eine Datei', 'plural'),
    ('', 'Content-Type: text/plain', 'header'),
    ('menu\x04Open the file', 'Die Datei öffnen', 'msgctxt'),
    ('Could not open %s for reading', 'Konnte %s nicht zum Lesen öffnen', 'format'),
    ('Copied %d files to disk', '%d Dateien kopiert', 'format'),
    ('Missing value for %(name)s here', 'Wert für %(name)s fehlt hier', 'format'),
    ('Replace {0} with the new one', 'Ersetze {0} durch das Neue', 'format'),
    ('Hello {name} and welcome', 'Hallo {name} und willkommen', 'format'),
    ('Yesterday at the time', 'Gestern um %H:%M', 'format'),
    ('Open <b>this</b> file now', 'Öffne <b>diese</b> Datei jetzt', 'markup'),
    ('Tom &amp; Jerry are here', 'Tom &amp; Jerry sind hier', 'markup'),
    ('Use a back\\slash here', 'Nutze einen Rück\\strich hier', 'backslash'),
    ('_Open the file', 'Datei _öffnen', 'mnemonic'),
    ('&Open the file', '&Datei öffnen', 'mnemonic'),
    ('See https://example.org for help', 'Siehe https://example.org für Hilfe', 'url'),
    ('Mail bugs to bugs@example.org please', 'Fehler an bugs@example.org bitte', 'url'),
    ('First line\nsecond line here', 'Erste Zeile\nzweite Zeile hier', 'newline'),
    ('A tab\there in text', 'Ein Tab\thier im Text', 'newline'),
    ('word ' * 70, 'Wort ' * 70, 'too_long'),
    ('Save as PDF now', 'Save as PDF now', 'untranslated'),
    ('Save file', 'Datei speichern', 'short'),
    ('Vertical — RL', 'Vertikal — RL', 'short'),
    ('Sales rose 50% of the time', 'Der Absatz stieg in 50% der Fälle', None),
    ('Tom & Jerry are here', 'Tom & Jerry sind hier', None),
])
def test_drop_reason(english, translation, expected):
  assert catalogs.drop_reason(english, translation) == expected


def test_clean_pairs_normalises_both_sides():
  pairs = dict(catalogs.clean_pairs({'  Open   the file ': 'Die  Datei öffnen',
                                     'Save file': 'Datei speichern'}))
  assert pairs == {'Open the file': 'Die Datei öffnen'}


@pytest.mark.parametrize('locale, expected', [
    ('de', ('de', 0)), ('pt_BR', ('pt', 0)), ('pt', ('pt', 1)), ('de_CH', ('de', 1)),
    ('fr.UTF-8', ('fr', 0)), ('en_GB', None), ('sr@latin', None), ('C', None),
])
def test_locale_language(locale, expected):
  assert catalogs.locale_language(locale) == expected


# --- .mo reading ---------------------------------------------------------------

def test_read_mo_matches_written_entries(tmp_path):
  path = str(tmp_path / 'x.mo')
  write_mo(path, {'Open the file': 'Die Datei öffnen', 'One file\0Many files': 'Eine\0Viele',
                  'menu\x04Close the file': 'Die Datei schließen'})
  catalog = catalogs.read_mo(path)
  assert catalog['Open the file'] == 'Die Datei öffnen'
  assert catalog[('One file', 0)] == 'Eine' and catalog[('One file', 1)] == 'Viele'
  assert catalog['menu\x04Close the file'] == 'Die Datei schließen'
  assert dict(catalogs.clean_pairs(catalog)) == {'Open the file': 'Die Datei öffnen'}


def test_load_pairs_prefers_locales_and_skips_bad_files(tmp_path):
  root = str(tmp_path)
  def mo(locale, name, entries):
    write_mo(os.path.join(root, 'usr/share/locale', locale, 'LC_MESSAGES', name), entries)
  mo('pt', 'a.mo', {'Open the file now': 'Abrir o ficheiro agora',
                    'Close the file now': 'Fechar o ficheiro agora'})
  mo('pt_BR', 'b.mo', {'Open the file now': 'Abrir o arquivo agora'})
  mo('de_CH', 'a.mo', {'Open the file now': 'Die Datei jetzt öffnen (CH)',
                       'Print the page now': 'Die Seite jetzt drucken'})
  mo('de', 'b.mo', {'Open the file now': 'Die Datei jetzt öffnen'})
  mo('sr@latin', 'a.mo', {'Open the file now': 'Otvori datoteku sada'})
  mo('en_GB', 'a.mo', {'Open the colour now': 'Open the colour now'})
  bad = os.path.join(root, 'usr/share/locale/fr/LC_MESSAGES/bad.mo')
  os.makedirs(os.path.dirname(bad))
  with open(bad, 'wb') as f:
    f.write(b'not a catalog')
  errors = []
  pairs = catalogs.load_pairs([root], errors=errors)
  assert pairs['pt'] == {'Open the file now': 'Abrir o arquivo agora',
                         'Close the file now': 'Fechar o ficheiro agora'}
  assert pairs['de'] == {'Open the file now': 'Die Datei jetzt öffnen',
                         'Print the page now': 'Die Seite jetzt drucken'}
  assert set(pairs) == {'pt', 'de'}
  assert len(errors) == 1 and 'bad.mo' in errors[0]
  assert set(catalogs.load_pairs([root], languages=['de'])) == {'de'}


def test_missing_package_names_it_and_the_fix(tmp_path):
  with pytest.raises(catalogs.PackageError, match=r"'fortunes-xx'.*--catalog_dir"):
    catalogs.fetch_packages(['fortunes-xx'], catalog_dir=str(tmp_path))
  # Without network or package lists, or without apt at all, the same error type.
  with pytest.raises(catalogs.PackageError, match='no-such-package-mslam'):
    catalogs.download_package('no-such-package-mslam', str(tmp_path / 'debs'))


# --- fortunes ------------------------------------------------------------------

def test_split_fortunes():
  text = 'First one here.\n%\nSecond\none.\n%\n%\n\n%\nThird.\n'
  assert catalogs.split_fortunes(text) == ['First one here.', 'Second\none.', 'Third.']


def test_fortune_pieces():
  fortune = ('Man muss wissen, dass Stoff und Form immer\n'
             'miteinander verbunden existieren.\n'
             '\t\t-- Pierre Abelard (Logica)\n')
  assert catalogs.fortune_pieces(fortune) == [
      'Man muss wissen, dass Stoff und Form immer miteinander verbunden existieren.']
  # Quote marks around the whole piece go; a two-word piece is dropped.
  assert catalogs.fortune_pieces('"Never trust a computer."') == [
      'Never trust a computer.']
  assert catalogs.fortune_pieces('Too short.') == []
  # Chat logs: each speaker's line is a piece without its tag.
  assert catalogs.fortune_pieces('<joe> the build is broken again\n<ann> not my fault') == [
      'the build is broken again', 'not my fault']
  # ASCII art and code are not prose.
  assert catalogs.fortune_pieces('  /\\_/\\\n ( o.o )\n  > ^ <  meow meow meow') == []
  # A paragraph over 300 characters is split into sentences.
  sentence = 'This sentence has exactly eight words in it. '
  pieces = catalogs.fortune_pieces(sentence * 8 + 'Dr. Who said so.')
  assert pieces == [sentence.strip()] * 8 + ['Dr. Who said so.']


def test_is_prose_counts_marks_as_letters():
  assert catalogs.is_prose('पारदर्शिता की तरह आंतरिक प्रवाह के साथ रंग करने योग्य भराव')
  assert catalogs.is_prose('Klangdatei auswählen', min_words=1)
  assert not catalogs.is_prose('Klangdatei auswählen')
  assert not catalogs.is_prose('x = y * 2 + 3 for all words here')


def test_decode_text_falls_back_per_language():
  russian = 'Жизнь - это выяснение отношений с Вечностью.'
  czech = 'Šťastný je člověk, kterého varuje cizí chyba.'
  assert catalogs.decode_text(russian.encode('utf-8'), 'ru') == russian
  assert catalogs.decode_text(russian.encode('koi8_r'), 'ru') == russian
  assert catalogs.decode_text(czech.encode('iso8859_2'), 'cs') == czech
  assert catalogs.decode_text(czech.encode('iso8859_2'), 'pl') == czech
  assert catalogs.decode_text('Café crème'.encode('latin-1'), 'fr') == 'Café crème'


def test_read_fortunes_skips_indexes_and_offensive(tmp_path):
  games = tmp_path / 'usr/share/games/fortunes'
  (games / 'ru' / 'off').mkdir(parents=True)
  (games / 'ru' / 'life').write_bytes(
      'Жизнь - это выяснение отношений с Вечностью.\n%\nЕщё одна хорошая мысль здесь.\n'
      .encode('koi8_r'))
  (games / 'ru' / 'life.dat').write_bytes(b'\x00\x00\x00\x02binary index')
  (games / 'ru' / 'off' / 'rude').write_text('Это грубая шутка для взрослых.\n',
                                             encoding='utf-8')
  assert catalogs.read_fortunes(str(tmp_path), 'ru') == [
      'Жизнь - это выяснение отношений с Вечностью.', 'Ещё одна хорошая мысль здесь.']


# --- multi-way held-out logic ------------------------------------------------------

PAIRS = {
    'de': {'Open the file now': 'Die Datei jetzt öffnen',
           'Open this file now': 'Die Datei jetzt öffnen',  # same translation
           'Close the window now': 'Das Fenster jetzt schließen',
           'Print the page now': 'Die Seite jetzt drucken',
           'Only in German here': 'Nur auf Deutsch hier'},
    'fr': {'Open the file now': 'Ouvrir le fichier maintenant',
           'Open this file now': 'Ouvrir ce fichier maintenant',
           'Close the window now': 'Fermer la fenêtre maintenant',
           'Print the page now': 'Imprimer la page maintenant'},
}


def test_multiway_selection_and_hold_out():
  languages = ['en', 'de', 'fr']
  multiway = build.select_multiway(PAIRS, languages)
  assert multiway == sorted(['Open the file now', 'Open this file now',
                             'Close the window now', 'Print the page now'])
  held = {'Open the file now'}
  held_text = {lang: [build.multiway_texts(e, PAIRS, languages)[lang] for e in held]
               for lang in languages}
  train_pairs = build.remove_held_out(PAIRS, held)
  assert all('Open the file now' not in table for table in train_pairs.values())
  fortunes = {'en': ['open the file now!', 'A fortune in English here.'],
              'de': ['Die Datei jetzt öffnen.', 'Ein deutsches Sprichwort hier.']}
  rng = np.random.default_rng(0)
  for lang in languages:
    lines = build.training_text(lang, train_pairs, fortunes.get(lang, []),
                                       held_text[lang], rng, None)
    keys = {build.holdout_key(line) for line in lines}
    for text in held_text[lang]:
      assert build.holdout_key(text) not in keys, (lang, text, lines)
    assert len(lines) == len(set(lines))
  # The German translation shared by a held-in English string is gone too.
  de = build.training_text('de', train_pairs, fortunes['de'], held_text['de'], rng, None)
  assert sorted(de) == ['Das Fenster jetzt schließen', 'Die Seite jetzt drucken',
                        'Ein deutsches Sprichwort hier.', 'Nur auf Deutsch hier']
  en = build.training_text('en', train_pairs, fortunes['en'], held_text['en'], rng, 2)
  assert len(en) == 2


def test_select_translation_pairs_skips_held_out_strings():
  held = {'en': ['Open the file now'], 'de': ['Die Datei jetzt öffnen'],
          'fr': ['Ouvrir le fichier maintenant']}
  for seed in range(5):
    chosen = build.select_translation_pairs(PAIRS, ['en', 'de', 'fr'], held, 3, seed)
    assert set(chosen) == {'de', 'fr'}
    # All that is left: 'Open this file now' shares the held German translation.
    assert sorted(e for _, e in chosen['de']) == [
        'Close the window now', 'Only in German here', 'Print the page now']
    assert sorted(e for _, e in chosen['fr']) == [
        'Close the window now', 'Open this file now', 'Print the page now']
    for lang, got in chosen.items():
      assert all(PAIRS[lang][e] == xx for xx, e in got)
  with pytest.raises(SystemExit, match="3 of 4 .*'de'"):
    build.select_translation_pairs(PAIRS, ['en', 'de', 'fr'], held, 4, 0)


def test_select_translation_pairs_share_english_and_do_not_repeat():
  strings = {f'Select item number {i} now': i for i in range(100)}
  pairs = {'de': {e: f'Element Nummer {i} jetzt wählen' for e, i in strings.items()},
           'fr': {e: f"Choisir l'élément numéro {i}" for e, i in strings.items()}}
  chosen = build.select_translation_pairs(pairs, ['en', 'de', 'fr'], {}, 10, 0)
  # One shuffled order for all languages: both hold out the same English strings.
  assert [e for _, e in chosen['de']] == [e for _, e in chosen['fr']]
  assert chosen == build.select_translation_pairs(pairs, ['en', 'de', 'fr'], {}, 10, 0)
  assert chosen != build.select_translation_pairs(pairs, ['en', 'de', 'fr'], {}, 10, 1)
  # Three pairs, one translation up to case and final punctuation: one pair.
  same = {'de': {'Open the file now': 'Die Datei öffnen',
                 'Open the file now.': 'die Datei öffnen!',
                 'Close the file now': 'Die Datei öffnen.'}}
  assert len(build.select_translation_pairs(same, ['de'], {}, 1, 0)['de']) == 1
  with pytest.raises(SystemExit, match='1 of 2'):
    build.select_translation_pairs(same, ['de'], {}, 2, 0)


def test_translations_round_trip(tmp_path):
  path = str(tmp_path / 'de.tsv')
  build.write_translations(path, [('Die  Datei\töffnen', ' Open the\nfile '),
                                         ('Drucken', 'Print')])
  with open(path, encoding='utf-8') as f:
    assert f.read() == 'Die Datei öffnen\tOpen the file\nDrucken\tPrint\n'
  assert build.read_translations(path) == [('Die Datei öffnen', 'Open the file'),
                                                  ('Drucken', 'Print')]


def test_derive_seed_is_stable():
  assert build.derive_seed(0, 'text', 'de') == build.derive_seed(0, 'text', 'de')
  assert build.derive_seed(0, 'text', 'de') != build.derive_seed(1, 'text', 'de')
  assert build.derive_seed(0, 'text', 'de') != build.derive_seed(0, 'text', 'fr')


def test_encode_flac_rounds_to_sample_bits():
  t = np.arange(16000) / 16000
  waveform = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
  for bits in (16, 11):
    decoded, rate = sf.read(io.BytesIO(build.encode_flac(waveform, 16000, bits)),
                            dtype='int16')
    assert rate == 16000 and decoded.shape == waveform.shape
    step = 2 ** (16 - bits)
    assert np.all(decoded % step == 0)
    np.testing.assert_allclose(decoded / 32768, waveform, atol=step / 32768)
  info = sf.info(io.BytesIO(build.encode_flac(waveform, 16000, 11)))
  assert (info.format, info.subtype, info.channels) == ('FLAC', 'PCM_16', 1)


# --- synthesis -------------------------------------------------------------------------

def test_parse_wav_reads_streamed_header():
  samples = np.array([0, 1000, -1000, 32767], np.int16)
  fmt = struct.pack('<HHIIHH', 1, 1, 22050, 44100, 2, 16)
  # espeak --stdout writes 0x7fffffff-ish sizes; the parser must not trust them.
  wav = (b'RIFF' + struct.pack('<I', 0x7ffff024) + b'WAVE' + b'fmt ' + struct.pack('<I', 16)
         + fmt + b'data' + struct.pack('<I', 0x7ffff000) + samples.tobytes())
  waveform, rate = synthesis._parse_wav(wav)  # pylint: disable=protected-access
  assert rate == 22050
  np.testing.assert_array_equal(waveform, samples / 32768.0)


@needs_espeak
def test_synthesize_gives_16khz_float_audio():
  text = 'The quick brown fox jumps over the lazy dog.'
  waveform = synthesis.synthesize(text, 'en', np.random.default_rng(0))
  assert waveform.dtype == np.float32 and waveform.ndim == 1
  seconds = len(waveform) / synthesis.SAMPLE_RATE
  assert 1.5 < seconds < 5.0, seconds  # 9 words at 130-190 words per minute
  assert 0.29 < np.max(np.abs(waveform)) < 0.71
  again = synthesis.synthesize(text, 'en', np.random.default_rng(0))
  np.testing.assert_array_equal(waveform, again)


@needs_espeak
def test_voices_exist_for_presets():
  for preset in build.PRESETS.values():
    assert set(synthesis.check_languages(preset.languages)) == set(preset.languages)
  with pytest.raises(synthesis.SynthesisError, match='xx'):
    synthesis.voice_for('xx')


# --- a miniature end-to-end build -----------------------------------------------------

# English -> (German, French); the first 14 are multi-way candidates.
_FAKE_STRINGS = {
    'Open the file now': ('Die Datei jetzt öffnen', 'Ouvrir le fichier maintenant'),
    'Close the window now': ('Das Fenster jetzt schließen', 'Fermer la fenêtre maintenant'),
    'Print the page now': ('Die Seite jetzt drucken', 'Imprimer la page maintenant'),
    'Save the picture now': ('Das Bild jetzt speichern', "Enregistrer l'image maintenant"),
    'Delete the old layer': ('Die alte Ebene löschen', "Supprimer l'ancien calque"),
    'Rotate the image left': ('Das Bild nach links drehen', "Tourner l'image à gauche"),
    'Show the color palette': ('Die Farbpalette anzeigen', 'Afficher la palette'),
    'Zoom into the drawing': ('In die Zeichnung zoomen', 'Zoomer dans le dessin'),
    'Play the next song': ('Das nächste Lied abspielen', 'Lire la chanson suivante'),
    'Stop the playback here': ('Die Wiedergabe hier stoppen', 'Arrêter la lecture ici'),
    'Send the message now': ('Die Nachricht jetzt senden', 'Envoyer le message maintenant'),
    'Import the bank statement': ('Den Kontoauszug importieren', 'Importer le relevé bancaire'),
    'Crop the selected area': ('Den gewählten Bereich zuschneiden', 'Rogner la zone choisie'),
    'Mute the sound here': ('Den Ton hier stummschalten', 'Couper le son ici'),
    'Only in German here': ('Nur auf Deutsch hier', None),
    'Another German line here': ('Noch eine deutsche Zeile hier', None),
    'A third German line': ('Eine dritte deutsche Zeile', None),
}
# Each English string ends in its own Greek letter, which no other text holds:
# the vocabulary covers a held-out English string only if it is built from
# the downstream texts too.
FAKE_STRINGS = {f'{english} {chr(ord("α") + i)}': translations
                for i, (english, translations) in enumerate(_FAKE_STRINGS.items())}
# Sizes of the miniature build: a build of about a second, with more than one
# downstream item per language so that their ids and order are checked.
TINY = dict(speech=2, paired=2, dev=1, test=1, downstream_speech=2, downstream_text=3,
            max_text_lines=None, min_seconds=0.5, max_seconds=6.0)


def _fake_packages(root):
  """--catalog_dir with the packages a build of en, de, fr reads, a handful of strings each."""
  for i, lang in enumerate(['de', 'fr']):
    write_mo(os.path.join(root, 'vlc-l10n/usr/share/locale', lang, 'LC_MESSAGES', 'vlc.mo'),
             {e: t[i] for e, t in FAKE_STRINGS.items() if t[i] is not None})
  for name in catalogs.CATALOG_PACKAGES[1:] + ('fortunes-min',):
    os.makedirs(os.path.join(root, name), exist_ok=True)
  # Every German translation is also a German fortune (with another final
  # mark): held-out German strings must leave the German text by holdout_key.
  german = ''.join(f'%\n{t[0]}!\n' for t in FAKE_STRINGS.values())
  for name, lang, text in (('fortunes', 'en', 'A penny saved is a penny earned.\n%\n'
                            'Never put off until tomorrow.\n'),
                           ('fortunes-de', 'de', 'Morgenstund hat Gold im Mund.\n%\n'
                            'Wer rastet, der rostet.\n' + german)):
    games = os.path.join(root, name, 'usr/share/games/fortunes', lang)
    os.makedirs(games)
    with open(os.path.join(games, 'misc'), 'w', encoding='utf-8') as f:
      f.write(text)
  with open(os.path.join(root, 'versions.json'), 'w') as f:
    json.dump({'vlc-l10n': 'test-1'}, f)


def _records(path):
  out = []
  for record in tf.data.TFRecordDataset(path):
    feature = tf.train.Example.FromString(record.numpy()).features.feature
    out.append({k: (v.bytes_list.value[0] if v.bytes_list.value else v.int64_list.value[0])
                for k, v in feature.items()})
  return out


def _build_tiny(output, catalog_dir, workers):
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(build.PRESETS, 'small',
                  dataclasses.replace(build.PRESETS['small'], **TINY))
    return build.build(build.parse_args([
        f'--output={output}', '--languages=en,de,fr', f'--catalog_dir={catalog_dir}',
        '--no_system_locale', f'--workers={workers}']))


@pytest.fixture(scope='module')
def tiny_corpus(tmp_path_factory):
  """(metadata, output folder, catalog folder) of a miniature en, de, fr build."""
  root = tmp_path_factory.mktemp('tiny_corpus')
  catalog_dir = str(root / 'packages')
  _fake_packages(catalog_dir)
  output = str(root / 'corpus')
  return _build_tiny(output, catalog_dir, workers=2), output, catalog_dir


def _training_texts(output, lang):
  """Every pre-training text of a language: text lines and speech/paired transcripts."""
  with open(os.path.join(output, 'text', 'train', f'{lang}.txt'), encoding='utf-8') as f:
    texts = f.read().splitlines()
  for kind in ('speech', 'paired'):
    texts += [r['transcript'].decode()
              for r in _records(os.path.join(output, kind, 'train', f'{lang}.tfrecord'))]
  return texts


def _translation(english, lang):
  """The fake catalogs' translation of an English string, None when there is none."""
  return english if lang == 'en' else FAKE_STRINGS[english][['de', 'fr'].index(lang)]


@needs_espeak
def test_build_small_corpus(tiny_corpus):
  meta, output, _ = tiny_corpus
  assert meta['languages'] == ['en', 'de', 'fr']
  assert 'vlc-l10n=test-1' in meta['sources']
  held = {}
  ids = {}
  for lang in meta['languages']:
    for split in ('dev', 'test'):
      records = _records(os.path.join(output, 'paired', split, f'{lang}.tfrecord'))
      assert meta['kinds']['paired'][split][lang]['examples'] == len(records) == 1
      ids.setdefault(split, set()).add(tuple(r['id'] for r in records))
      for r in records:
        held.setdefault(lang, set()).add(build.holdout_key(r['transcript'].decode()))
        held.setdefault('en', set()).add(build.holdout_key(r['english'].decode()))
        assert r['english'] and r['id'].startswith(b'mw-')
  assert all(len(v) == 1 for v in ids.values())  # Identical ids across languages.
  assert ids['dev'] != ids['test']
  for lang in meta['languages']:
    with open(os.path.join(output, 'text', 'train', f'{lang}.txt'), encoding='utf-8') as f:
      train = f.read().splitlines()
    assert meta['kinds']['text']['train'][lang]['examples'] == len(train)
    for kind in ('speech', 'paired'):
      records = _records(os.path.join(output, kind, 'train', f'{lang}.tfrecord'))
      assert len(records) == 2 and meta['kinds'][kind]['train'][lang]['examples'] == 2
      for r in records:
        assert r['language'] == lang.encode() and r['english'] == b''
        waveform, rate = sf.read(io.BytesIO(r['audio']), dtype='float32')
        assert rate == 16000 and len(waveform) == r['num_samples']
        assert 0.5 * rate <= len(waveform) <= 6.0 * rate
        train.append(r['transcript'].decode())
    leaked = [t for t in train if build.holdout_key(t) in held[lang]]
    assert not leaked, (lang, leaked)
  assert os.path.getsize(os.path.join(output, 'vocab.txt')) > 0


@needs_espeak
def test_downstream_speech_is_multiway_and_held_out(tiny_corpus):
  meta, output, _ = tiny_corpus
  items = {}  # id -> {language: (transcript, english)}
  for lang in meta['languages']:
    records = _records(os.path.join(output, 'downstream', 'speech', 'train', f'{lang}.tfrecord'))
    assert len(records) == TINY['downstream_speech']
    assert meta['downstream']['speech']['train'][lang] == {
        'examples': len(records),
        'seconds': round(sum(r['num_samples'] for r in records) / 16000, 2)}
    for r in records:
      assert r['id'].startswith(b'ds-') and r['language'] == lang.encode()
      waveform, _ = sf.read(io.BytesIO(r['audio']), dtype='float32')
      assert len(waveform) == r['num_samples']
      transcript, english = r['transcript'].decode(), r['english'].decode()
      assert transcript == _translation(english, lang)  # so english == transcript in 'en'
      items.setdefault(r['id'], {})[lang] = (transcript, english)
  # The same items in every language, under one id each.
  assert len(items) == TINY['downstream_speech']
  assert all(set(v) == {'en', 'de', 'fr'} and len({e for _, e in v.values()}) == 1
             for v in items.values())
  downstream_english = {v['en'][1] for v in items.values()}
  eval_english = {r['english'].decode() for split in ('dev', 'test')
                  for r in _records(os.path.join(output, 'paired', split, 'en.tfrecord'))}
  assert len(eval_english) == 2 and not downstream_english & eval_english
  # Held out of every language's pre-training data, the translations too.
  for lang in meta['languages']:
    train = {build.holdout_key(t) for t in _training_texts(output, lang)}
    for english in downstream_english:
      assert build.holdout_key(_translation(english, lang)) not in train, (lang, english)


@needs_espeak
def test_downstream_text_files_and_hold_out(tiny_corpus):
  meta, output, _ = tiny_corpus
  assert set(meta['downstream']['text']) == {'train', 'dev', 'test'}
  held_english = set()
  for lang in ('de', 'fr'):
    splits = {}
    for split in ('train', 'dev', 'test'):
      path = os.path.join(output, 'downstream', 'text', split, f'{lang}.tsv')
      with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines()
      assert lines and all(line.count('\t') == 1 for line in lines), lines
      splits[split] = [tuple(line.split('\t')) for line in lines]
      assert meta['downstream']['text'][split][lang] == {'examples': len(lines)}
      for xx, english in splits[split]:
        assert xx == normalize_text(xx) and english == normalize_text(english)
        assert FAKE_STRINGS[english][['de', 'fr'].index(lang)] == xx
    assert len(splits['train']) == TINY['downstream_text']
    # dev and test are the paired dev and test sets.
    for split in ('dev', 'test'):
      records = _records(os.path.join(output, 'paired', split, f'{lang}.tfrecord'))
      assert splits[split] == [(r['transcript'].decode(), r['english'].decode())
                               for r in records]
    assert not ({e for _, e in splits['train']}
                & {e for s in ('dev', 'test') for _, e in splits[s]})
    # The xx side is held out of its language, the English side of all languages.
    train = {build.holdout_key(t) for t in _training_texts(output, lang)}
    assert not {build.holdout_key(xx) for xx, _ in splits['train']} & train
    held_english |= {e for _, e in splits['train']}
  assert 'en' not in meta['downstream']['text']['train']
  assert not os.path.exists(os.path.join(output, 'downstream', 'text', 'train', 'en.tsv'))
  # No language keeps the catalog pair of a held English string; another
  # language's fortune copy ('...!') may stay, the hold-out being per language.
  for lang in meta['languages']:
    train = set(_training_texts(output, lang))
    for english in held_english:
      assert _translation(english, lang) not in train, (lang, english)


@needs_espeak
def test_build_is_deterministic_whatever_the_workers(tiny_corpus, tmp_path):
  meta, output, catalog_dir = tiny_corpus
  again = str(tmp_path / 'again')
  assert _build_tiny(again, catalog_dir, workers=1) == meta
  files = sorted(os.path.relpath(os.path.join(d, f), output)
                 for d, _, names in os.walk(output) for f in names)
  assert files == sorted(os.path.relpath(os.path.join(d, f), again)
                         for d, _, names in os.walk(again) for f in names)
  assert any(f.startswith('downstream') for f in files)
  for name in files:
    with open(os.path.join(output, name), 'rb') as a, open(os.path.join(again, name), 'rb') as b:
      assert a.read() == b.read(), name


@needs_espeak
def test_vocabulary_covers_every_text_and_nothing_else(tiny_corpus):
  meta, output, _ = tiny_corpus
  texts = []
  for lang in meta['languages']:
    texts += _training_texts(output, lang)
    for path in (*[os.path.join(output, 'paired', split, f'{lang}.tfrecord')
                   for split in ('dev', 'test')],
                 os.path.join(output, 'downstream', 'speech', 'train', f'{lang}.tfrecord')):
      texts += [r[k].decode() for r in _records(path) for k in ('transcript', 'english')]
    if lang != 'en':
      for split in ('train', 'dev', 'test'):
        path = os.path.join(output, 'downstream', 'text', split, f'{lang}.tsv')
        texts += [t for pair in build.read_translations(path) for t in pair]
  symbols = CharacterVocabulary.load(os.path.join(output, 'vocab.txt')).symbols
  assert sorted(symbols) == sorted(set(''.join(texts)))
