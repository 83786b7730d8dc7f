"""Speech data shared by the teacher and the student stage (docs/data.md).

Modules: ``text`` (normalize_text), ``manifest`` (Utterance, load_manifest, writers), ``audio``
(reading and resampling), ``features`` (Kaldi fbank, feature store), ``tokenizer`` (Tokenizer),
``demo_corpus`` (the offline espeak-ng corpus). Nothing is imported here, so importing one module
does not pull in the others' dependencies.
"""
