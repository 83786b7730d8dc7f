"""Output units of the student and input units of the teachers: one :class:`Tokenizer` class over
four kinds.

* ``char``: characters of the normalised training text; the space is the visible piece ``▁``.
  Ids: ``<blank>`` 0, ``<sos/eos>`` 1, ``<unk>`` 2, then the characters in code-point order.
* ``bpe``: a byte-pair encoding trained with HF ``tokenizers`` on (normalised) LM text,
  SentencePiece-style word boundaries (``▁``), same three specials at ids 0, 1, 2.
* ``hf``: any Hugging Face tokenizer (a directory with ``tokenizer.json``, a hub id in the local
  HF cache, or a ``.gguf`` file), so a teacher's own units can be the student's output units.
  Specials: BERT-like ``[PAD]`` is the CTC blank and ``[CLS]``/``[SEP]`` the decoder's sos/eos;
  GPT-like tokenizers use their pad token as blank when it is distinct from bos/eos, else
  ``<|endoftext|>``, else an extra ``<blank>`` id appended after the vocabulary.
* ``phone``: phones of English text from an offline grapheme-to-phoneme step, espeak-ng's ASCII
  phoneme mnemonics (``espeak-ng -q -x``, voice ``en-us``) with the stress marks removed; each
  word is phonemised on its own (no cross-word context, so a word always gets the same phones)
  and words are separated by the ``▁`` piece. The phone vocabulary is built from the given text
  (e.g. the LM text); phones outside it map to ``<unk>``. Same specials at ids 0, 1, 2. The
  words of that text and their phones are saved as a lexicon (``lexicon.json``) and looked up
  first, so encoding them needs no G2P call and cannot drift; other words go through espeak-ng
  (batched, memoised). The G2P backend, its version and voice, and the lexicon are part of
  :meth:`Tokenizer.content_hash`. ``decode`` is lossy: it returns the phone string (phones
  separated by spaces, words by `` | ``), not the text.

Text normalisation is *not* part of ``encode``: callers apply
:func:`kdcache.data.text.normalize_text` once and pass the result, so the teacher stage and the
student stage encode byte-identical strings. ``encode`` never adds special tokens.
``decode(encode(t)) == t`` for normalised ``t`` made of characters the tokenizer knows (an
uncased BERT tokenizer also strips accents); not for ``phone``.

Saved form (``save(dir)``): ``kdcache_tokenizer.json`` (kind, specials, char pieces) plus, for
``bpe``/``hf``, the backend's ``tokenizer.json``. Loading a saved tokenizer needs neither
transformers nor the original files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Tokenizer", "TokenizerError", "SPACE_PIECE"]

META_FILE = "kdcache_tokenizer.json"
BACKEND_FILE = "tokenizer.json"
LEXICON_FILE = "lexicon.json"  # phone: word -> phones of the build text
FORMAT = "kdcache-tokenizer"
FORMAT_VERSION = 1
SPACE_PIECE = "\u2581"  # "▁", as SentencePiece writes the word boundary
BLANK, SOS_EOS, UNK = "<blank>", "<sos/eos>", "<unk>"
_SPECIAL_NAMES = ("blank", "bos", "eos", "pad", "unk")
_APOS = re.compile(r"\s*'\s*")
PHONE_WORD_SEP = " | "  # phone decode: between words
log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, loaded or used; the message names the source."""


class Tokenizer:
    """Text <-> ids for one set of units. Build with :meth:`build_char`, :meth:`train_bpe`,
    :meth:`load`; do not call the constructor directly.

    Attributes:
        name: Human-readable name (``char``, ``bpe500``, the HF model name).
        kind: ``char``, ``bpe`` or ``hf``.
        blank_id: CTC blank.
        bos_id, eos_id: Attention-decoder start and end symbols (equal for ``char``/``bpe``).
        pad_id: Id to pad token sequences with (always masked; may equal ``blank_id``).
        unk_id: Unknown unit, or None when the tokenizer has none (byte-level BPE).
        vocab_size: Number of ids, specials included; every id is in ``[0, vocab_size)``.
    """

    def __init__(
        self,
        *,
        kind: str,
        name: str,
        specials: dict[str, int | None],
        pieces: list[str] | None = None,
        backend=None,
        extra_blank: bool = False,
        source: str = "",
        g2p: dict | None = None,
        lexicon: dict[str, list[str]] | None = None,
    ):
        self.kind = kind
        self.g2p = dict(g2p) if g2p else None  # phone: {"backend", "version", "voice"}
        self.lexicon = lexicon  # phone: word -> phones (the build text's words)
        self._g2p_impl = None
        self.name = name
        self.source = source
        self._pieces = pieces
        self._backend = backend
        self._extra_blank = extra_blank
        if pieces is not None:
            self._piece_to_id = {p: i for i, p in enumerate(pieces)}
        for k in _SPECIAL_NAMES:
            if k not in specials:
                raise TokenizerError(f"tokenizer {name!r}: special {k!r} missing")
        self.blank_id: int = int(specials["blank"])
        self.bos_id: int = int(specials["bos"])
        self.eos_id: int = int(specials["eos"])
        self.pad_id: int = int(specials["pad"])
        self.unk_id: int | None = None if specials["unk"] is None else int(specials["unk"])
        if backend is not None:
            self._base_size = backend.get_vocab_size(with_added_tokens=True)
            self.vocab_size = self._base_size + (1 if extra_blank else 0)
        else:
            self._base_size = self.vocab_size = len(pieces)
        self._drop = {self.blank_id, self.bos_id, self.eos_id, self.pad_id}
        for k in _SPECIAL_NAMES:
            v = getattr(self, f"{k}_id")
            if v is not None and not 0 <= v < self.vocab_size:
                raise TokenizerError(
                    f"tokenizer {name!r}: {k} id {v} outside [0, {self.vocab_size})"
                )

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def build_char(cls, texts: Iterable[str], *, name: str = "char") -> Tokenizer:
        """Character tokenizer over every character of ``texts`` (already normalised)."""
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        chars.discard(" ")
        chars.discard(SPACE_PIECE)
        for bad in ("\n", "\t", "\r"):
            chars.discard(bad)
        pieces = [BLANK, SOS_EOS, UNK, SPACE_PIECE] + sorted(chars)
        return cls(
            kind="char",
            name=name,
            pieces=pieces,
            specials={"blank": 0, "bos": 1, "eos": 1, "pad": 0, "unk": 2},
        )

    @classmethod
    def build_phone(
        cls, texts: Iterable[str], *, name: str = "phone", voice: str = "en-us", g2p=None
    ) -> Tokenizer:
        """Phone tokenizer over every phone the G2P gives for ``texts`` (already normalised).

        Args:
            texts: Sentences, e.g. the LM text; all words are phonemised (in batches).
            voice: espeak-ng voice.
            g2p: A G2P object (``.info`` dict and ``.phonemize(words) -> list[list[str]]``);
                default :class:`EspeakG2P` (needs the ``espeak-ng`` program).
        """
        g2p = g2p or EspeakG2P(voice)
        words = sorted({w for t in texts for w in t.split()})
        lexicon = dict(zip(words, g2p.phonemize(words), strict=True))
        phones: set[str] = set()
        for ph in lexicon.values():
            phones.update(ph)
        phones.discard(SPACE_PIECE)
        pieces = [BLANK, SOS_EOS, UNK, SPACE_PIECE] + sorted(phones)
        self = cls(
            kind="phone",
            name=name,
            pieces=pieces,
            g2p=g2p.info,
            lexicon=lexicon,
            specials={"blank": 0, "bos": 1, "eos": 1, "pad": 0, "unk": 2},
        )
        self._g2p_impl = g2p
        return self

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        out_dir: str | os.PathLike | None = None,
        *,
        min_frequency: int = 2,
        name: str | None = None,
    ) -> Tokenizer:
        """Train a BPE on ``texts`` (already normalised) with HF ``tokenizers``.

        Args:
            texts: Training sentences, e.g. the LM text.
            vocab_size: Target size including the three specials and the alphabet.
            out_dir: When given, the tokenizer is saved there.
            min_frequency: Minimum pair count for a merge.

        Deterministic: the same texts and size give the same merges and :meth:`content_hash`.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        texts = list(texts)
        alphabet = sorted({c for t in texts for c in t} - {" ", "\n", "\t", "\r"})
        min_size = 3 + len(alphabet) + 1
        if vocab_size < min_size:
            raise TokenizerError(
                f"bpe vocab_size {vocab_size} is smaller than specials + alphabet ({min_size})"
            )
        tok = HFTokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE_PIECE, prepend_scheme="always"
        )
        tok.decoder = decoders.Metaspace(replacement=SPACE_PIECE, prepend_scheme="always")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=[BLANK, SOS_EOS, UNK],
            initial_alphabet=alphabet,
            limit_alphabet=len(alphabet) + 1,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        self = cls(
            kind="bpe",
            name=name or f"bpe{tok.get_vocab_size()}",
            backend=tok,
            specials={"blank": 0, "bos": 1, "eos": 1, "pad": 0, "unk": 2},
        )
        if out_dir is not None:
            self.save(out_dir)
        return self

    @classmethod
    def load(cls, path_or_hub_id: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.

        Args:
            path_or_hub_id: a directory saved by :meth:`save`; a Hugging Face tokenizer
                directory (``tokenizer.json`` is read with ``tokenizers`` alone; other layouts go
                through ``transformers.AutoTokenizer``); a ``.gguf`` file; or a hub id available
                in the local HF cache.

        Raises:
            TokenizerError: nothing loadable there (the message says what was tried).
        """
        src = str(path_or_hub_id)
        p = Path(src).expanduser()
        if p.is_dir() and (p / META_FILE).exists():
            return cls._load_saved(p)
        if p.is_dir() and (p / BACKEND_FILE).exists():
            return cls._from_hf_json(
                p / BACKEND_FILE, _hf_special_tokens(p), name=_hf_name(p), source=str(p)
            )
        if p.is_file() and p.name == BACKEND_FILE:
            return cls._from_hf_json(
                p, _hf_special_tokens(p.parent), name=_hf_name(p.parent), source=str(p)
            )
        if p.is_file() and p.suffix == ".gguf":
            return cls._from_transformers(
                str(p.parent), gguf_file=p.name, name=p.stem, source=str(p)
            )
        if p.exists() and not p.is_dir():
            raise TokenizerError(
                f"{p}: not a tokenizer (expected a directory, tokenizer.json or .gguf)"
            )
        if not p.exists() and (p.is_absolute() or src.startswith((".", "~"))):
            raise TokenizerError(f"cannot load tokenizer {src!r}: no such file or directory")
        local_only = False
        if not p.exists():  # a hub id: fail at once offline (kdcache.hub), not after retries
            from kdcache.hub import check_hub_name

            try:
                local_only = check_hub_name(src, "tokenizer", what="tokenizer")
            except FileNotFoundError as e:
                raise TokenizerError(str(e)) from None
        return cls._from_transformers(
            src, name=Path(src).name if p.is_dir() else src, source=src, local_files_only=local_only
        )

    @classmethod
    def _load_saved(cls, d: Path) -> Tokenizer:
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{d / META_FILE}: cannot read ({e})") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise TokenizerError(
                f"{d / META_FILE}: not a kdcache tokenizer of version {FORMAT_VERSION}"
            )
        backend = None
        if meta["kind"] in ("bpe", "hf"):
            backend = _read_backend(d / BACKEND_FILE)
        lexicon = None
        if meta["kind"] == "phone":
            try:
                lexicon = json.loads((d / LEXICON_FILE).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(
                    f"{d / LEXICON_FILE}: cannot read the phone lexicon ({e})"
                ) from None
        return cls(
            kind=meta["kind"],
            name=meta["name"],
            specials=meta["specials"],
            pieces=meta.get("pieces"),
            backend=backend,
            extra_blank=bool(meta.get("extra_blank", False)),
            source=meta.get("source", str(d)),
            g2p=meta.get("g2p"),
            lexicon=lexicon,
        )

    @classmethod
    def _from_hf_json(
        cls, file: Path, special_tokens: dict[str, str | None], *, name: str, source: str
    ) -> Tokenizer:
        backend = _read_backend(file)
        return cls._from_backend(backend, special_tokens, name=name, source=source)

    @classmethod
    def _from_transformers(
        cls,
        src: str,
        *,
        gguf_file: str | None = None,
        name: str,
        source: str,
        local_files_only: bool = False,
    ) -> Tokenizer:
        try:
            from transformers import AutoTokenizer

            kw: dict = {"gguf_file": gguf_file} if gguf_file else {}
            if local_files_only:
                kw["local_files_only"] = True
            hf = AutoTokenizer.from_pretrained(src, **kw)
        except Exception as e:
            raise TokenizerError(
                f"cannot load tokenizer {source!r}: not a saved kdcache tokenizer, not a directory "
                f"with tokenizer.json, and transformers.AutoTokenizer failed ({type(e).__name__}: {e})"
            ) from None
        return cls.from_hf(hf, name=name, source=source)

    @classmethod
    def from_hf(cls, hf_tokenizer, *, name: str | None = None, source: str = "") -> Tokenizer:
        """Wrap an already loaded ``transformers`` fast tokenizer (e.g. a teacher's), so that its
        :meth:`content_hash` is the one the student computes from the same files. The HF
        tokenizer is not modified.
        """
        from tokenizers import Tokenizer as HFTokenizer

        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerError(
                f"{source or name!r}: only fast (tokenizers-backed) HF tokenizers are supported"
            )
        specials = {
            k: getattr(hf_tokenizer, f"{k}_token", None)
            for k in ("pad", "unk", "bos", "eos", "cls", "sep")
        }
        name = name or getattr(hf_tokenizer, "name_or_path", "") or "hf"
        return cls._from_backend(
            HFTokenizer.from_str(backend.to_str()), specials, name=name, source=source or name
        )

    @classmethod
    def _from_backend(
        cls, backend, tokens: dict[str, str | None], *, name: str, source: str
    ) -> Tokenizer:
        backend.no_padding()
        backend.no_truncation()

        def tid(tok: str | None) -> int | None:
            return None if tok is None else backend.token_to_id(tok)

        bos = (
            tid(tokens.get("cls")) if tid(tokens.get("cls")) is not None else tid(tokens.get("bos"))
        )
        eos = (
            tid(tokens.get("sep")) if tid(tokens.get("sep")) is not None else tid(tokens.get("eos"))
        )
        if bos is None:
            bos = eos
        if eos is None:
            eos = bos
        unk = tid(tokens.get("unk"))
        pad = tid(tokens.get("pad"))
        extra_blank = False
        if pad is not None and pad not in (bos, eos):
            blank = pad
        elif tid("<|endoftext|>") is not None and tid("<|endoftext|>") not in (bos, eos):
            blank = tid("<|endoftext|>")
        else:
            blank = backend.get_vocab_size(with_added_tokens=True)
            extra_blank = True
        if bos is None:  # no sos/eos at all: share the blank, as char/bpe share <sos/eos>
            bos = eos = blank
        if pad is None:
            pad = blank
        return cls(
            kind="hf",
            name=name,
            backend=backend,
            extra_blank=extra_blank,
            source=source,
            specials={"blank": blank, "bos": bos, "eos": eos, "pad": pad, "unk": unk},
        )

    # --- use ---------------------------------------------------------------------------------
    def _phone_g2p(self):
        if self._g2p_impl is None:
            info = self.g2p or {}
            if info.get("backend") != "espeak-ng":
                raise TokenizerError(
                    f"tokenizer {self.name!r}: unknown G2P backend {info.get('backend')!r}"
                )
            self._g2p_impl = EspeakG2P(info.get("voice", "en-us"))
            if self._g2p_impl.info.get("version") != info.get("version"):
                log.warning("tokenizer %r was built with espeak-ng %s, this machine has %s: phones "
                            "may differ", self.name, info.get("version"),
                            self._g2p_impl.info.get("version"))  # fmt: skip
        return self._g2p_impl

    def _phone_ids(self, texts: Sequence[str]) -> list[list[int]]:
        lex = self.lexicon or {}
        words = sorted({w for t in texts for w in t.split()} - lex.keys())
        table = dict(zip(words, self._phone_g2p().phonemize(words), strict=True)) if words else {}
        table.update(lex)
        get, unk = self._piece_to_id.get, self.unk_id
        out = []
        for t in texts:
            ids: list[int] = []
            for j, w in enumerate(t.split()):
                if j:
                    ids.append(get(SPACE_PIECE))
                ids.extend(get(p, unk) for p in table[w])
            out.append(ids)
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (already normalised by the caller), without special tokens."""
        if self.kind == "phone":
            return self._phone_ids([text])[0]
        if self._pieces is not None:
            unk = self.unk_id
            get = self._piece_to_id.get
            return [get(SPACE_PIECE if c == " " else c, unk) for c in text]
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of several texts (the HF backends run them in parallel; the phone G2P
        phonemises all their words in one batch)."""
        if self.kind == "phone":
            return self._phone_ids(list(texts))
        if self._pieces is not None:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; blank, sos/eos and pad are dropped, an unknown unit reads as its piece."""
        ids = [int(i) for i in ids if int(i) not in self._drop]
        if self.kind == "phone":  # lossy: the phone string, not the text
            words = " ".join(self._pieces[i] for i in ids).split(SPACE_PIECE)
            return PHONE_WORD_SEP.join(" ".join(w.split()) for w in words if w.split())
        if self._pieces is not None:
            text = "".join(self._pieces[i] for i in ids).replace(SPACE_PIECE, " ")
            return " ".join(text.split())
        ids = [i for i in ids if i < self._base_size]
        text = self._backend.decode(ids, skip_special_tokens=False)
        if self.kind == "hf":
            # BERT-like pre-tokenizers split "world's" into "world ' s"; normalised text never has
            # a space next to an apostrophe, so joining them restores it exactly.
            text = _APOS.sub("'", text)
        return " ".join(text.split())

    def id_to_piece(self, i: int) -> str:
        """The unit string of id ``i`` (``▁`` marks a word boundary for char/bpe)."""
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"id {i} outside [0, {self.vocab_size}) of tokenizer {self.name!r}")
        if self._pieces is not None:
            return self._pieces[i]
        if i >= self._base_size:
            return BLANK
        return self._backend.id_to_token(i)

    def piece_to_id(self, piece: str) -> int | None:
        if self._pieces is not None:
            return self._piece_to_id.get(piece)
        if self._extra_blank and piece == BLANK:
            return self._base_size
        return self._backend.token_to_id(piece)

    @property
    def specials(self) -> dict[str, int | None]:
        return {k: getattr(self, f"{k}_id") for k in _SPECIAL_NAMES}

    def content_hash(self) -> str:
        """Stable hex digest of everything that decides ids: kind, units, rules and specials.

        Two tokenizers with the same hash encode every text to the same ids; the name, where it
        was loaded from, and padding/truncation settings do not enter it.
        """
        h = {"kind": self.kind, "specials": self.specials, "extra_blank": self._extra_blank}
        if self.g2p is not None:
            h["g2p"] = self.g2p
        if self.lexicon is not None:
            lex = json.dumps(
                self.lexicon, sort_keys=True, ensure_ascii=False, separators=(",", ":")
            )
            h["lexicon"] = hashlib.sha256(lex.encode("utf-8")).hexdigest()
        if self._pieces is not None:
            h["pieces"] = self._pieces
        else:
            h["backend"] = _canonical_backend(self._backend)
        blob = json.dumps(h, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the tokenizer to ``out_dir`` so that :meth:`load` restores it (same hash)."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "source": self.source,
            "vocab_size": self.vocab_size,
            "specials": self.specials,
            "extra_blank": self._extra_blank,
            "content_hash": self.content_hash(),
        }
        if self.g2p is not None:
            meta["g2p"] = self.g2p
        if self.lexicon is not None:
            _write_atomic(
                d / LEXICON_FILE,
                json.dumps(self.lexicon, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
                + "\n",
            )
        if self._pieces is not None:
            meta["pieces"] = self._pieces
        else:
            _write_atomic(d / BACKEND_FILE, self._backend.to_str(pretty=True))
        _write_atomic(d / META_FILE, json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
        return d

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"blank={self.blank_id}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, "
            f"unk={self.unk_id}, hash={self.content_hash()[:12]})"
        )


# ---------------------------------------------------------------------------------------------

STRESS_MARKS = "',"  # espeak -x primary/secondary stress, dropped from the phones
PAUSE_CHARS = set("_:")  # espeak -x pauses ("_", "_:"), dropped


class EspeakG2P:
    """Offline English G2P through the ``espeak-ng`` program: word -> phones (``-x`` mnemonics,
    stress marks and pauses removed). Words are phonemised one per stdin line, many per call, and memoised."""

    def __init__(self, voice: str = "en-us", program: str = "espeak-ng", batch: int = 5000):
        exe = shutil.which(program)
        if exe is None:
            raise TokenizerError(
                f"phone tokenizer: {program!r} not found; install espeak-ng (scripts/setup_env.sh "
                f"does: apt-get install espeak-ng)"
            )
        self.program = exe
        self.voice = voice
        self.batch = batch
        self._memo: dict[str, list[str]] = {}
        self.info = {"backend": "espeak-ng", "version": espeak_version(exe), "voice": voice}

    def _run(self, words: Sequence[str]) -> list[str]:
        res = subprocess.run(
            [self.program, "-q", "-x", "--sep= ", "-v", self.voice], input="\n".join(words) + "\n",
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise TokenizerError(f"espeak-ng failed ({res.returncode}): {res.stderr.strip()[:200]}")
        return res.stdout.splitlines()

    def _phones(self, line: str) -> list[str]:
        out = []
        for p in line.split():
            p = p.strip(STRESS_MARKS)
            if p and not set(p) <= PAUSE_CHARS:
                out.append(p)
        return out

    def phonemize(self, words: Sequence[str]) -> list[list[str]]:
        """Phones of each word (a word without letters may get none)."""
        todo = sorted({w for w in words if w not in self._memo})
        for i in range(0, len(todo), self.batch):
            part = todo[i : i + self.batch]
            lines = self._run(part)
            if len(lines) != len(part):  # espeak split or merged lines: one call per word
                lines = [" ".join(self._run([w])) for w in part]
            for w, line in zip(part, lines, strict=True):
                self._memo[w] = self._phones(line)
        return [list(self._memo[w]) for w in words]


def espeak_version(program: str = "espeak-ng") -> str:
    """``1.51`` from ``espeak-ng --version`` ("eSpeak NG text-to-speech: 1.51  Data at: ...")."""
    res = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r":\s*([0-9][^\s]*)", res.stdout)
    return m.group(1) if m else res.stdout.strip()[:40]


def _read_backend(file: Path):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:
        raise TokenizerError(f"{file}: cannot read tokenizer ({e})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def _canonical_backend(backend) -> dict:
    d = json.loads(backend.to_str())
    d.pop("truncation", None)
    d.pop("padding", None)
    return d


def _hf_special_tokens(d: Path) -> dict[str, str | None]:
    """Special tokens named in a HF directory's tokenizer_config.json / special_tokens_map.json."""
    found: dict[str, str | None] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = d / fname
        if not f.exists():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        for k in ("pad", "unk", "bos", "eos", "cls", "sep"):
            v = cfg.get(f"{k}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and found.get(k) is None:
                found[k] = v
    return found


def _hf_name(d: Path) -> str:
    f = d / "tokenizer_config.json"
    if f.exists():
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
            for key in ("name_or_path", "_name_or_path"):
                if isinstance(cfg.get(key), str) and cfg[key]:
                    return cfg[key]
        except json.JSONDecodeError:
            pass
    d = d.resolve()
    return d.name if d.name not in ("model", "tokenizer") else f"{d.parent.name}/{d.name}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
