"""Preparers that turn released speech-translation corpora into the input of ``gdps-prep``.

Each layout has its own module that only *reads* the release and lists its segments
(:class:`~fairseq_gdps.data.corpora.segments.Segment`); :func:`~fairseq_gdps.data.corpora.segments.write_corpus`
then checks them against the audio, cuts/resamples what needs it into 16 kHz mono wavs and writes
``{train,dev,test}.tsv`` (columns id, audio, src_lang, tgt_lang, tgt_text, src_text, speaker,
duration), which is what ``gdps-prep --corpus`` reads.

- :mod:`.tunisian`: IWSLT 2022-2025 Tunisian Arabic-English (LDC2022E01 + the official split lists);
- :mod:`.bigc`: Bemba-English, BIG-C (csikasote/bigc split TSV/JSONL + per-utterance wavs);
- :mod:`.iwslt_stamped`: IWSLT low-resource releases with ``stamped.tsv`` + ``txt/*.eng`` (Irish-English);
- :mod:`.taltech`: IWSLT 2025 Estonian-English (taltechnlp/iwslt2025_est2eng_data);
- :mod:`.generic`: any TSV (column mapping) and Kaldi/ESPnet data folders.
"""
from fairseq_gdps.data.corpora.segments import Segment, merge_corpora, write_corpus  # noqa: F401
