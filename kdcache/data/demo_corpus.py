"""The offline English demo corpus: public-domain sentences spoken by espeak-ng.

Text: the King James Bible (public domain; Debian ``bible-kjv-text``, read with its ``bible``
program) and the BSD-licensed Debian ``fortunes`` files listed in :data:`FORTUNE_FILES` (files
that collect lyrics, comic strips or a novelist's quotes are left out). Sentences are split into
clauses of at most :data:`MAX_WORDS` words, kept only when espeak-ng will say exactly the words of
the normalised transcript (letters and plain punctuation: no digits, symbols or abbreviations
with dots), normalised with :func:`~kdcache.data.text.normalize_text` and de-duplicated.

Audio: each utterance gets an accent (:data:`VOICES`), a voice variant (:data:`VARIANTS`), a speed
and a pitch, is resampled to 16 kHz mono with sox, padded with a little silence, scaled, and
mixed with generated noise (white, pink, brown or mains hum) at an SNR drawn from
:data:`SNR_CHOICES` (or left clean). Every choice comes from ``numpy.random.default_rng`` seeded by
``(seed, split, index)``, so a seed gives byte-identical audio whatever the worker count.

Splits: ``train`` (paired, small), ``dev`` and ``test`` (paired, disjoint sentences) and
``lm_text.txt`` (every remaining sentence, text only: the large external LM text). The layout is
in docs/data.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcache.data.manifest import Utterance, write_jsonl, write_kaldi_dir, write_lhotse_cuts
from kdcache.data.text import normalize_text

__all__ = [
    "CorpusError",
    "SIZES",
    "SPLITS",
    "build_demo_corpus",
    "format_summary",
    "load_sentences",
    "available_variants",
]

SPLITS = ("train", "dev", "test")
CORPUS_FORMAT = "kdcache-demo-corpus"
CORPUS_VERSION = 1
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class SizeSpec:
    train: int
    dev: int
    test: int


# Utterances per split. Utterances average ~4.5 s, so "demo" has ~1.5 h of training speech and
# "large" ~6 h. Dev and test are picked first (and voiced from their own seeded streams), so
# "demo" and "large" share the very same dev and test utterances, audio included.
SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(train=20, dev=8, test=8),
    "small": SizeSpec(train=150, dev=50, test=50),
    "demo": SizeSpec(train=1200, dev=300, test=300),
    "large": SizeSpec(train=4800, dev=300, test=300),
}

# Accents shipped with espeak-ng itself (the mbrola voices need the mbrola program and are
# skipped; without it espeak-ng silently falls back to en-gb).
VOICES = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
# Voice variants (espeak-ng-data/voices/!v) that sound like a person: robots, echo and whisper
# variants are left out. "" is the accent's own voice.
VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "croak",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "klatt6",
    "adam",
    "Alex",
    "Andy",
    "Annie",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "Gene",
    "grandma",
    "grandpa",
    "Jacky",
    "john",
    "Lee",
    "linda",
    "max",
    "Michael",
    "Mike",
    "norbert",
    "paul",
    "quincy",
    "rob",
    "robert",
    "steph",
    "travis",
    "victor",
    "zac",
)
# Held out from training (``voices="heldout"``, the default): dev and test are spoken only by
# these variants, so their error rates measure voices the student never heard; the accent in
# HELDOUT_ACCENTS is heard by dev and test only. ``voices="shared"`` is the corpus of format
# version 1 (every split draws from every voice).
HELDOUT_VARIANTS = (
    "m3",
    "m7",
    "f2",
    "f5",
    "klatt3",
    "Andy",
    "belinda",
    "david",
    "grandma",
    "linda",
    "norbert",
    "quincy",
    "steph",
)
HELDOUT_ACCENTS = ("en-gb-scotland",)
VOICE_MODES = ("heldout", "shared")
SPEED_WPM = (130, 210)
PITCH = (25, 75)
# SNR in dB; None is clean speech.
SNR_CHOICES = (None, 30.0, 20.0, 15.0, 10.0, 5.0)
SNR_PROBS = (0.3, 0.15, 0.2, 0.15, 0.12, 0.08)
NOISE_KINDS = ("white", "pink", "brown", "hum")

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# BSD-licensed per /usr/share/doc/fortunes/copyright. Left out: lyrics (songs-poems), comic
# strips (zippy), one novelist's quotes (pratchett), TV (startrek), The Tao of Programming (tao),
# IRC logs (knghtbrd), ascii art, and files with edgy jokes (ethnic, men-women, drugs).
FORTUNE_FILES = (
    "fortunes",
    "wisdom",
    "platitudes",
    "education",
    "work",
    "science",
    "people",
    "politics",
    "law",
    "medicine",
    "food",
    "kids",
    "love",
    "sports",
    "computers",
    "riddles",
    "miscellaneous",
    "cookie",
    "magic",
    "paradoxum",
    "goedel",
    "news",
    "definitions",
    "disclaimer",
)
BIBLE_RANGE = "Gen1:1-Rev22:21"

MIN_WORDS, MAX_WORDS = 3, 24  # any sentence kept (LM text)
PAIRED_WORDS = (4, 20)  # sentences eligible for the paired splits
_SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z ,.;:!?'\"()\-]*$")
_CLAUSE_END = re.compile(r"(?<=[.;:!?])\s+")
_REF = re.compile(r"^\S+\d+:\d+\s+")
_ABBREV = re.compile(
    r"\b(?:[A-Za-z]\.){2,}|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Lt|Sgt|Rev|vs|etc|Inc|Ltd|Co|No)\."
)
_SINGLE_LETTER = re.compile(r"\b(?![AaIiOo]\b)[A-Za-z]\b")


class CorpusError(RuntimeError):
    """The corpus cannot be built (missing program or data, output exists)."""


# ---------------------------------------------------------------------------------------------
# Text


def _clauses(text: str) -> list[str]:
    """Split text into clauses at . ; : ! ? and greedily re-join short ones up to MAX_WORDS."""
    out, cur, n = [], [], 0
    for c in _CLAUSE_END.split(text.strip()):
        w = len(c.split())
        if cur and n + w > MAX_WORDS:
            out.append(" ".join(cur))
            cur, n = [], 0
        cur.append(c)
        n += w
    if cur:
        out.append(" ".join(cur))
    return out


def _speakable(s: str) -> str | None:
    """The sentence as espeak-ng should read it, or None when its words would not match the
    normalised transcript (digits, symbols, abbreviations, spelled-out letters)."""
    s = " ".join(s.split()).strip(" -")
    if not s or not _SPEAKABLE.match(s) or _ABBREV.search(s) or _SINGLE_LETTER.search(s):
        return None
    if "--" in s or "''" in s:
        return None
    # ALL-CAPS words (the Bible's LORD, shouting in fortunes) may be spelled out letter by letter.
    return re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).capitalize(), s)


def _bible_verses() -> list[str]:
    exe = shutil.which("bible")
    if exe is None or not Path("/usr/lib/bible.data").exists():
        raise CorpusError(
            "the King James Bible is not installed: apt-get install bible-kjv "
            "(or run scripts/setup_env.sh)"
        )
    res = subprocess.run([exe, "-f", "-l", "100000", BIBLE_RANGE], capture_output=True, text=True)
    if res.returncode != 0:
        raise CorpusError(f"'bible' failed: {res.stderr.strip()}")
    return [_REF.sub("", line) for line in res.stdout.splitlines() if _REF.match(line)]


def _fortune_entries() -> list[str]:
    entries = []
    for name in FORTUNE_FILES:
        p = FORTUNE_DIR / name
        if not p.exists():
            continue
        raw = p.read_text(encoding="utf-8", errors="replace")
        for entry in raw.split("\n%\n"):
            lines = [
                ln
                for ln in entry.splitlines()
                if ln.strip() and not re.match(r"^\s*(--|\u2014|~)", ln)
            ]
            # Indented lines are verse, code or attributions: keep only plain prose entries.
            if lines and not any(ln.startswith(("\t", "    ")) for ln in lines):
                entries.append(" ".join(ln.strip() for ln in lines))
    return entries


def load_sentences(*, fortunes: bool = True) -> list[tuple[str, str, str]]:
    """Every usable sentence, in a fixed order, without duplicate transcripts.

    Returns:
        ``(source, spoken, normalised)`` triples: ``source`` is ``kjv`` or ``fortunes``,
        ``spoken`` the text given to espeak-ng, ``normalised`` the transcript.
    """
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    sources: list[tuple[str, list[str]]] = [("kjv", _bible_verses())]
    if fortunes:
        sources.append(("fortunes", _fortune_entries()))
    for source, texts in sources:
        for text in texts:
            for clause in _clauses(text):
                spoken = _speakable(clause)
                if spoken is None:
                    continue
                norm = normalize_text(spoken)
                if not MIN_WORDS <= len(norm.split()) <= MAX_WORDS or norm in seen:
                    continue
                seen.add(norm)
                out.append((source, spoken, norm))
    return out


# ---------------------------------------------------------------------------------------------
# Audio


def available_variants() -> tuple[str, ...]:
    """The :data:`VARIANTS` this espeak-ng installation has (plus "")."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise CorpusError(
            "espeak-ng is not installed: apt-get install espeak-ng (or run scripts/setup_env.sh)"
        )
    res = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True)
    have = set(re.findall(r"!v/(\S+)", res.stdout))
    return tuple(v for v in VARIANTS if v == "" or v in have)


@dataclass(frozen=True)
class SynthJob:
    path: str
    spoken: str
    voice: str
    variant: str
    speed: int
    pitch: int
    gain_db: float
    lead_s: float
    trail_s: float
    snr_db: float | None
    noise: str
    noise_seed: tuple[int, ...]


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind in ("pink", "brown"):
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        spec /= np.sqrt(f) if kind == "pink" else f
        spec[0] = 0.0
        x = np.fft.irfft(spec, n)
    elif kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        base = rng.choice([50.0, 60.0])
        x = sum(
            np.sin(2 * np.pi * base * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3, 5)
        )
        x = x + 0.3 * _noise("pink", n, rng)
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    x = np.asarray(x, dtype=np.float64)
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def synthesize(job: SynthJob) -> float:
    """Speak ``job`` into a 16 kHz mono 16-bit WAV at ``job.path``; returns its duration (s)."""
    from kdcache.data.audio import decode_wav, resample, write_wav

    voice = job.voice + (f"+{job.variant}" if job.variant else "")
    cmd = ["espeak-ng", "-v", voice, "-s", str(job.speed), "-p", str(job.pitch), "--stdout"]
    res = subprocess.run(cmd, input=job.spoken.encode("utf-8"), capture_output=True)
    if res.returncode != 0 or len(res.stdout) < 100:
        raise CorpusError(f"espeak-ng failed for {job.path}: {res.stderr.decode(errors='replace')}")
    x, sr = decode_wav(res.stdout, "espeak-ng output")
    x = resample(x, sr, SAMPLE_RATE).astype(np.float64)
    # Trim espeak's own trailing silence, then add our own (noise-only) padding.
    loud = np.flatnonzero(np.abs(x) > 1e-3)
    if len(loud):
        x = x[max(0, loud[0] - 160) : loud[-1] + 160]
    peak = np.max(np.abs(x)) + 1e-12
    x = x / peak * 0.5 * 10 ** (job.gain_db / 20)
    x = np.concatenate(
        [np.zeros(int(job.lead_s * SAMPLE_RATE)), x, np.zeros(int(job.trail_s * SAMPLE_RATE))]
    )
    if job.snr_db is not None:
        rng = np.random.default_rng(list(job.noise_seed))
        speech = x[np.abs(x) > 1e-4]
        p_speech = np.mean(speech * speech) if len(speech) else 1e-6
        noise = _noise(job.noise, len(x), rng)
        x = x + noise * np.sqrt(p_speech / 10 ** (job.snr_db / 10))
    peak = np.max(np.abs(x))
    if peak > 0.99:  # never clip: scale the mixture down instead
        x = x * (0.99 / peak)
    write_wav(job.path, x, SAMPLE_RATE)
    return len(x) / SAMPLE_RATE


def split_voices(
    split: str, variants: tuple[str, ...], mode: str = "heldout"
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(accents, variants) a split draws from. ``heldout``: train never hears
    :data:`HELDOUT_VARIANTS` nor :data:`HELDOUT_ACCENTS`; dev and test use only the held-out
    variants (with every accent). ``shared``: every split uses everything."""
    if mode not in VOICE_MODES:
        raise CorpusError(f"unknown voices mode {mode!r}: choose from {', '.join(VOICE_MODES)}")
    if mode == "shared":
        return VOICES, variants
    held = tuple(v for v in variants if v in HELDOUT_VARIANTS)
    if split == "train":
        return (
            tuple(a for a in VOICES if a not in HELDOUT_ACCENTS),
            tuple(v for v in variants if v not in HELDOUT_VARIANTS),
        )
    if not held:
        raise CorpusError(
            "this espeak-ng has none of the held-out voice variants "
            f"{HELDOUT_VARIANTS}: build with voices='shared'"
        )
    return VOICES, held


def _jobs_for(
    split: str,
    sentences: list[tuple[str, str, str]],
    wav_dir: Path,
    seed: int,
    variants: tuple[str, ...],
    voices: tuple[str, ...] = VOICES,
) -> tuple[list[SynthJob], list[Utterance]]:
    split_no = SPLITS.index(split)
    rng = np.random.default_rng([seed, split_no, 1])
    jobs, utts = [], []
    for i, (_, spoken, norm) in enumerate(sentences):
        voice = voices[rng.integers(len(voices))]
        variant = variants[rng.integers(len(variants))]
        speaker = f"{voice}_{variant or 'default'}"
        utt_id = f"{speaker}-{split}-{i:05d}"
        snr = SNR_CHOICES[rng.choice(len(SNR_CHOICES), p=SNR_PROBS)]
        job = SynthJob(
            path=str(wav_dir / f"{utt_id}.wav"),
            spoken=spoken,
            voice=voice,
            variant=variant,
            speed=int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1)),
            pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
            gain_db=float(np.round(rng.uniform(-12.0, 0.0), 2)),
            lead_s=float(np.round(rng.uniform(0.05, 0.4), 3)),
            trail_s=float(np.round(rng.uniform(0.05, 0.4), 3)),
            snr_db=snr,
            noise=NOISE_KINDS[rng.integers(len(NOISE_KINDS))],
            noise_seed=(seed, split_no, i),
        )
        jobs.append(job)
        utts.append(Utterance(utt_id, job.path, norm, speaker=speaker))
    return jobs, utts


# ---------------------------------------------------------------------------------------------
# The corpus


def build_demo_corpus(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    size: str = "demo",
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    voices: str = "heldout",
) -> dict:
    """Build the demo corpus into ``out`` (atomically: a temporary sibling renamed at the end).

    Args:
        out: Corpus root to create.
        seed: Seeds the sentence split and every synthesis choice.
        size: ``tiny``, ``small`` or ``demo`` (see :data:`SIZES`).
        workers: Processes running espeak-ng and sox.
        overwrite: Replace an existing ``out``.
        progress: Show a progress bar.
        voices: ``heldout`` (dev/test voices and one accent never in train) or ``shared``.

    Returns:
        The summary also written to ``out/corpus.json``.
    """
    if size not in SIZES:
        raise CorpusError(f"unknown size {size!r}: choose from {', '.join(SIZES)}")
    for prog in ("espeak-ng", "sox"):
        if shutil.which(prog) is None:
            raise CorpusError(
                f"'{prog}' is not installed: apt-get install {prog} (or run scripts/setup_env.sh)"
            )
    out = Path(out).absolute()  # manifests hold absolute paths: never relative to a temp dir
    if out.exists() and not overwrite:
        raise CorpusError(f"{out}: already exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    spec = SIZES[size]
    variants = available_variants()
    split_voices("dev", variants, voices)  # refuse a bad mode before any work

    sentences = load_sentences()
    rng = np.random.default_rng([seed, 0])
    order = rng.permutation(len(sentences))
    eligible = [
        i for i in order if PAIRED_WORDS[0] <= len(sentences[i][2].split()) <= PAIRED_WORDS[1]
    ]
    need = spec.test + spec.dev + spec.train
    if len(eligible) < need:
        raise CorpusError(f"only {len(eligible)} sentences for {need} paired utterances")
    picked = {
        "test": eligible[: spec.test],
        "dev": eligible[spec.test : spec.test + spec.dev],
        "train": eligible[spec.test + spec.dev : need],
    }
    used = set(eligible[:need])
    lm_text = [sentences[i][2] for i in order if i not in used]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        all_jobs: list[SynthJob] = []
        split_utts: dict[str, list[Utterance]] = {}
        for split in SPLITS:
            wav_dir = tmp / split / "wav"
            wav_dir.mkdir(parents=True)
            accents, split_variants = split_voices(split, variants, voices)
            jobs, utts = _jobs_for(
                split, [sentences[i] for i in picked[split]], wav_dir, seed, split_variants, accents
            )
            all_jobs += jobs
            split_utts[split] = utts
        durations = dict(
            zip((j.path for j in all_jobs), _run_jobs(all_jobs, workers, progress), strict=True)
        )

        summary: dict = {
            "format": CORPUS_FORMAT,
            "format_version": CORPUS_VERSION,
            "seed": seed,
            "size": size,
            "sample_rate": SAMPLE_RATE,
            "splits": {},
        }
        final_utts: dict[str, list[Utterance]] = {}
        for split in SPLITS:
            # Durations are known: manifests carry them, so readers never probe the audio.
            utts = [
                Utterance(u.id, u.audio, u.text, 0.0, round(durations[u.audio], 4), u.speaker)
                for u in split_utts[split]
            ]
            write_jsonl(utts, tmp / split / "manifest.jsonl")  # relative paths: relocatable
            final_utts[split] = utts
            secs = sum(u.duration for u in utts)
            summary["splits"][split] = {
                "utterances": len(utts),
                "hours": round(secs / 3600, 4),
                "seconds": round(secs, 2),
                "words": sum(len(u.text.split()) for u in utts),
                "speakers": len({u.speaker for u in utts}),
                "manifest": f"{split}/manifest.jsonl",
            }
        (tmp / "lm_text.txt").write_text("".join(t + "\n" for t in lm_text), encoding="utf-8")
        sources: dict[str, int] = {}
        for s, _, _ in sentences:
            sources[s] = sources.get(s, 0) + 1
        summary["lm_text"] = {
            "path": "lm_text.txt",
            "sentences": len(lm_text),
            "words": sum(len(t.split()) for t in lm_text),
        }
        summary["sentences_by_source"] = sources
        summary["voices"] = list(VOICES)
        summary["voice_split"] = voices
        summary["heldout"] = (
            {
                "accents": list(HELDOUT_ACCENTS),
                "variants": [v for v in variants if v in HELDOUT_VARIANTS],
            }
            if voices == "heldout"
            else None
        )
        summary["variants"] = [v or "default" for v in variants]
        summary["tools"] = {
            "espeak-ng": _version(["espeak-ng", "--version"]),
            "sox": _version(["sox", "--version"]),
        }
        summary["workers"] = workers
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Kaldi and lhotse tools resolve relative paths against their working directory, so those
    # manifests get absolute paths, which exist only now. corpus.json, written last, marks the
    # corpus complete; on a failure the new corpus goes and an old one comes back.
    try:
        final = out.resolve()
        for split, utts in final_utts.items():
            moved = [
                Utterance(
                    u.id,
                    str(final / split / "wav" / Path(u.audio).name),
                    u.text,
                    u.start,
                    u.duration,
                    u.speaker,
                )
                for u in utts
            ]
            write_kaldi_dir(
                [Utterance(u.id, u.audio, u.text, speaker=u.speaker) for u in moved], final / split
            )
            write_lhotse_cuts(moved, final / split / "cuts.jsonl.gz", sample_rate=SAMPLE_RATE)
        summary["build_seconds"] = round(time.perf_counter() - t0, 1)
        marker = out / "corpus.json"
        marker.with_suffix(".tmp").write_text(
            json.dumps(summary, indent=1) + "\n", encoding="utf-8"
        )
        os.replace(marker.with_suffix(".tmp"), marker)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return summary


def _run_jobs(jobs: list[SynthJob], workers: int, progress: bool) -> list[float]:
    it = None
    if workers <= 1:
        it = map(synthesize, jobs)
        ex = None
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        it = ex.map(synthesize, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 4))))
    try:
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(jobs), desc="espeak-ng", unit="utt")
        return list(it)
    finally:
        if ex is not None:
            ex.shutdown(cancel_futures=True)


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return ""


def format_summary(summary: dict) -> str:
    """The corpus summary as a few human-readable lines."""
    lines = [f"demo corpus (size {summary['size']}, seed {summary['seed']}):"]
    for split, s in summary["splits"].items():
        lines.append(
            f"  {split:<6}{s['utterances']:>6} utterances  {s['hours']:.2f} h  "
            f"{s['words']:>7} words  {s['speakers']:>4} speakers"
        )
    lm = summary["lm_text"]
    lines.append(f"  lm_text {lm['sentences']} sentences, {lm['words']} words (text only)")
    lines.append(
        f"  voices: {len(summary['voices'])} accents x {len(summary['variants'])} variants; "
        f"sources: {summary['sentences_by_source']}"
    )
    lines.append(f"  built in {summary['build_seconds']} s with {summary['workers']} workers")
    return "\n".join(lines)
