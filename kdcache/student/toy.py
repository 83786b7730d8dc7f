"""A tiny, learnable toy corpus for tests, benches and smoke runs of kdtrain, made in seconds.

Every character of a short text is a 70 ms pure tone at a character-specific pitch (a word gap is
silence), written as WAV, turned into real fbank features by ``write_features`` and described
by a JSONL manifest: a CTC/attention student learns it in a few dozen steps on CPU. The teacher
cache is written with ``CacheWriter`` from a synthetic "LM": at the position of token y it puts
most of its mass on y, some on the next letter, the rest spread thin; hidden states are a fixed
random embedding of y plus noise. Nothing here is a real model; it exercises the plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = ["bad", "cab", "dab", "fed", "bed", "ace", "add", "egg", "fad", "gab", "bag", "cage",
         "face", "dead", "beef", "deaf"]  # fmt: skip
LETTERS = "abcdefg"
SR = 16000
HIDDEN_LAYER = 6


@dataclass
class ToyCorpus:
    root: Path
    manifest: Path
    features: Path
    tokenizer: Path
    cache: Path | None
    utt_ids: list[str]


def toy_texts(num_utts: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(num_utts)]


def _tone_audio(text: str, rng: np.random.Generator) -> np.ndarray:
    parts = []
    for c in text:
        if c == " ":
            parts.append(np.zeros(int(0.05 * SR)))
            continue
        f = 250.0 + 260.0 * LETTERS.index(c)
        t = np.arange(int(0.07 * SR)) / SR
        parts.append(0.3 * np.sin(2 * np.pi * f * t) * np.hanning(len(t)))
    x = np.concatenate([np.zeros(800), *parts, np.zeros(800)])
    return x + 0.003 * rng.standard_normal(len(x))


def teacher_targets(
    ids: np.ndarray, vocab_size: int, k: int, temperature: float, letter_ids: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic LM targets for token ids [T]: (topk_ids [T, k], topk_logprobs [T, k], tail [T])."""
    z = np.full((len(ids), vocab_size), -2.0)
    z[:, letter_ids] = 0.0
    rows = np.arange(len(ids))
    z[rows, ids] = 3.0
    nxt = {a: b for a, b in zip(letter_ids, letter_ids[1:] + letter_ids[:1], strict=True)}
    for i, y in enumerate(ids):
        if int(y) in nxt and nxt[int(y)] != int(y):
            z[i, nxt[int(y)]] = 1.5
    z = z / temperature
    logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logp, order, axis=1)
    rest = np.ones(logp.shape, dtype=bool)
    np.put_along_axis(rest, order, False, axis=1)
    tail = np.where(
        rest.any(1), np.logaddexp.reduce(np.where(rest, logp, -np.inf), axis=1), -np.inf
    )
    return order.astype(np.int64), top.astype(np.float32), tail.astype(np.float32)


def make_toy_corpus(
    root: str | Path,
    num_utts: int = 32,
    seed: int = 0,
    k: int = 4,
    temperature: float = 5.0,
    hidden_dim: int = 16,
    teachers: tuple[str, ...] = ("lm",),
    with_cache: bool = True,
    tokenizer=None,
    chunk_positions: int | None = None,
) -> ToyCorpus:
    """Write WAVs, a manifest, a feature store, a char tokenizer and (optionally) a cache."""
    from kdcache.data.features import write_features
    from kdcache.data.manifest import Utterance, write_jsonl
    from kdcache.data.text import normalize_text
    from kdcache.data.tokenizer import Tokenizer

    root = Path(root)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = toy_texts(num_utts, seed)
    utts = []
    from kdcache.data.audio import write_wav

    for i, text in enumerate(texts):
        uid = f"toy{seed}-{i:04d}"
        wav = write_wav(root / "wav" / f"{uid}.wav", _tone_audio(text, rng), SR)
        utts.append(Utterance(id=uid, audio=str(wav), text=text))
    manifest = write_jsonl(utts, root / "train.jsonl")
    feats = root / "train.fbank"
    write_features(utts, feats, progress=False, overwrite=True)
    tok = tokenizer or Tokenizer.build_char([normalize_text(" ".join(WORDS))])
    tok_dir = tok.save(root / "tokenizer")
    cache_path = None
    if with_cache:
        cache_path = write_toy_cache(
            root / "toy.kdc", {u.id: u.text for u in utts}, tok, teachers=teachers, k=k,
            temperature=temperature, hidden_dim=hidden_dim, chunk_positions=chunk_positions,
        )  # fmt: skip
    return ToyCorpus(root, Path(manifest), feats, Path(tok_dir), cache_path, [u.id for u in utts])


def write_toy_cache(
    path: str | Path,
    texts: dict[str, str],
    tok,
    teachers: tuple[str, ...] = ("lm",),
    k: int = 4,
    temperature: float = 5.0,
    hidden_dim: int = 16,
    token_ids=None,
    tokenizer_hash: str | None = None,
    chunk_positions: int | None = None,
) -> Path:
    """Write a synthetic teacher cache for ``texts`` (utt id -> raw transcript).

    ``token_ids`` (a function text -> ids) and ``tokenizer_hash`` override what is stored, to
    make deliberately mismatched caches in tests.
    """
    from kdcache.cache_format import CacheWriter, TeacherRecord, UttTargets, content_hash
    from kdcache.data.text import normalize_text

    path = Path(path)
    letter_ids = [tok.piece_to_id(c) for c in LETTERS]
    if any(i is None for i in letter_ids):  # a teacher in other units (subwords, phones)
        specials = {tok.blank_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id}
        letter_ids = [i for i in range(tok.vocab_size) if i not in specials][: len(LETTERS)]
    emb = np.random.default_rng(123).standard_normal((tok.vocab_size, hidden_dim))
    for t_i, name in enumerate(teachers):
        record = TeacherRecord(
            name=name, kind="causal_lm", model_id=f"toy-{name}", model_hash="0" * 32,
            tokenizer_id=tok.name, tokenizer_hash=tokenizer_hash or tok.content_hash(),
            vocab_size=tok.vocab_size, k=k, temperature=temperature,
            hidden_layers=(HIDDEN_LAYER,), hidden_dims={str(HIDDEN_LAYER): hidden_dim},
            **({"chunk_positions": chunk_positions} if chunk_positions else {}),
        )  # fmt: skip
        hrng = np.random.default_rng(1000 + t_i)
        with CacheWriter(path, record, fsync=False) as w:
            for uid, raw in texts.items():
                text = normalize_text(raw)
                ids = np.asarray((token_ids or tok.encode)(text), dtype=np.int64)
                top_ids, top_lp, tail = teacher_targets(
                    ids, tok.vocab_size, k, temperature, letter_ids
                )
                hid = emb[ids] + 0.1 * hrng.standard_normal((len(ids), hidden_dim))
                w.add(UttTargets(
                    utt_id=uid, topk_ids=top_ids, topk_logprobs=top_lp, tail_logmass=tail,
                    hidden={HIDDEN_LAYER: hid.astype(np.float32)}, token_ids=ids.astype(np.int32),
                    text=text, input_hash=content_hash(text),
                ))  # fmt: skip
    return path


def toy_subword_tokenizer(vocab_size: int = 24):
    """A small BPE over the toy words: units other than the toy's character student."""
    from kdcache.data.text import normalize_text
    from kdcache.data.tokenizer import Tokenizer

    return Tokenizer.train_bpe(
        [normalize_text(w) for w in WORDS] * 4 + [" ".join(WORDS)],
        vocab_size,
        min_frequency=2,
        name="toy-bpe",
    )


def add_toy_teacher(
    corpus: ToyCorpus, name: str, tokenizer, k: int = 4, temperature: float = 1.0
) -> Path:
    """Add teacher ``name`` in ``tokenizer``'s units (e.g. subwords or phones, not the student's
    characters) to the toy corpus's cache; its token_ids are that tokenizer's ids."""
    import json

    if corpus.cache is None:
        raise ValueError("the toy corpus has no cache")
    texts = {}
    with open(corpus.manifest) as f:
        for line in f:
            d = json.loads(line)
            texts[d["id"]] = d["text"]
    return write_toy_cache(
        corpus.cache, texts, tokenizer, teachers=(name,), k=k, temperature=temperature
    )
