"""Teacher adapters and the build loop (docs/teachers.md).

- ``build.build_cache``: run one teacher over a manifest into a cache (``kdcache build``).
- ``masked_lm.MaskedLMTeacher``, ``causal_lm.CausalLMTeacher``, ``lstm_lm.LSTMTeacher``: adapters.
- ``lstm_lm.train_lm``: train the LSTM LM teacher (``kdcache train-lm``).
- ``topk.topk_targets``: top-k log-probs and tail log-mass from logits, on the device.

Importing this package imports nothing heavy; torch and transformers load inside the functions.
"""
