"""``kdcache demo-corpus``, ``kdcache features`` and ``kdcache tokenizer``: thin wrappers over
kdcache.data (docs/data.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from kdcache.commands.errors import fail as _fail
from kdcache.commands.params import one_of


def refuse_overwrite(out: Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse to write over an existing output unless ``--overwrite`` (an empty directory is fine)."""
    if overwrite or not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    _fail(
        f"{option} {out} already exists: pass --overwrite to replace it, or choose another {option}"
    )


# kdcache.data.demo_corpus.SIZES and VOICE_MODES (tests/test_cli_help.py keeps them equal), spelled
# out because importing that module loads numpy for every --help.
CORPUS_SIZES = ("tiny", "small", "demo", "large")
VOICE_MODES = ("heldout", "shared")


def demo_corpus(
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Directory to create (the corpus root)."
    ),
    seed: int = typer.Option(
        0, "--seed", metavar="N", help="Seed for sentence split, voices, prosody and noise."
    ),
    size: str = typer.Option(
        "demo",
        "--size",
        help="tiny: ~20 train utterances (tests); small: ~10 min; demo: ~1.5 h; large: ~6 h "
        "(the same dev and test as demo).",
        **one_of(CORPUS_SIZES),
    ),
    workers: int = typer.Option(2, "--workers", metavar="N", help="Processes synthesising audio."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing corpus at --out."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    voices: str = typer.Option(
        "heldout",
        "--voices",
        help="heldout: dev/test voices (13 variants, 1 accent) never heard in train; shared: every split hears every voice (the old corpus).",
        **one_of(VOICE_MODES),
    ),
) -> None:
    """Build the offline English demo corpus: public-domain sentences spoken by espeak-ng.

    Many voices, speeds, pitches and added noise; train/dev/test manifests (JSONL, Kaldi, lhotse)
    plus a large text-only LM set (lm_text.txt). Layout: docs/data.md.
    """
    from kdcache.data.demo_corpus import CorpusError, build_demo_corpus, format_summary

    try:
        summary = build_demo_corpus(
            out,
            seed=seed,
            size=size,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
            voices=voices,
        )
    except (CorpusError, OSError, ValueError) as e:
        _fail(e)
    typer.echo(format_summary(summary))


def features(
    manifest: Path = typer.Argument(
        ...,
        metavar="MANIFEST",
        help="Manifest (Kaldi dir, .jsonl, lhotse cuts) or a demo-corpus root (all splits).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        metavar="DIR",
        help="Store to create. Default for a demo-corpus root: ROOT/feats/SPLIT.fbank.",
    ),
    workers: int = typer.Option(2, "--workers", metavar="N", help="Processes computing features."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing store (atomically)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    keepbits: int | None = typer.Option(
        None,
        "--keepbits",
        metavar="BITS",
        min=1,
        max=10,
        help="Round to this many of float16's 10 mantissa bits (6: <= 0.8% error, ~60% of the "
        "bytes). Default: keep all.",
    ),
    repack: bool = typer.Option(
        False,
        "--repack",
        help="MANIFEST is an existing feature store: rewrite it to --out with --keepbits "
        "(same utterances and CMVN stats; no audio needed).",
    ),
) -> None:
    """Compute 80-dim Kaldi fbank features once into a chunked feature store (+ global CMVN stats)."""
    import time

    from kdcache.data.audio import AudioError
    from kdcache.data.features import FeatureError, write_features
    from kdcache.data.manifest import ManifestError, load_manifest

    if repack:
        from kdcache.data.features import FeatureError, repack_features

        if out is None:
            _fail(ValueError("--repack needs --out (the new store)"))
        try:
            src_bytes = sum(f.stat().st_size for f in manifest.rglob("*") if f.is_file())
            store = repack_features(
                manifest, out, keepbits=keepbits, progress=progress, overwrite=overwrite
            )
        except (FeatureError, OSError) as e:
            _fail(e)
        new_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        typer.echo(
            f"{out}: {len(store)} utterances, keepbits {keepbits}: {new_bytes / 1e6:.1f} MB "
            f"({new_bytes / max(src_bytes, 1):.0%} of {manifest})"
        )
        return
    jobs: list[tuple[Path, Path]] = []
    if manifest.is_dir() and (manifest / "corpus.json").exists():
        from kdcache.data.demo_corpus import SPLITS

        for split in SPLITS:
            target = (out or manifest / "feats") / f"{split}.fbank"
            jobs.append((manifest / split / "manifest.jsonl", target))
    else:
        if out is None:
            _fail(ValueError("--out is required unless MANIFEST is a demo-corpus root"))
        jobs.append((manifest, out))
    try:
        for src, dst in jobs:
            utts = load_manifest(src)
            t0 = time.perf_counter()
            store = write_features(
                utts, dst, workers=workers, progress=progress, overwrite=overwrite,
                keepbits=keepbits,
            )  # fmt: skip
            dt = time.perf_counter() - t0
            hours = store.total_frames * store.frame_shift / 3600
            typer.echo(
                f"{dst}: {len(store)} utterances, {store.total_frames} frames ({hours:.2f} h) "
                f"in {dt:.1f} s ({hours * 3600 / max(dt, 1e-9):.0f}x real time, {workers} workers)"
            )
    except (ManifestError, FeatureError, AudioError, OSError) as e:
        _fail(e)


TOKENIZER_ACTIONS = ("train", "show", "encode", "export")
TOKENIZER_KINDS = ("char", "bpe", "phone")


def tokenizer(
    action: str = typer.Argument(
        ...,
        help="train: build from text; show: summary; encode: ids of --sample; export: save a HF/gguf tokenizer as a kdcache tokenizer dir.",
        **one_of(TOKENIZER_ACTIONS, metavar="ACTION"),
    ),
    path: str | None = typer.Argument(
        None,
        metavar="PATH",
        help="Tokenizer (show/encode/export): saved dir, HF dir, .gguf file, hub id, or the "
        "tokenizer of an offline model: minilm, smollm2.",
    ),
    text: list[Path] | None = typer.Option(
        None,
        "--text",
        metavar="FILE",
        help="train: text files (one sentence a line) or manifests (their transcripts); repeatable.",
    ),
    kind: str = typer.Option(
        "bpe",
        "--kind",
        help="train: char, bpe or phone (English phones through espeak-ng, offline).",
        **one_of(TOKENIZER_KINDS),
    ),
    vocab_size: int = typer.Option(
        500, "--vocab-size", metavar="N", help="train --kind bpe: vocabulary size incl. specials."
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="DIR", help="train/export: directory to write the tokenizer to."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="train/export: replace an existing --out."
    ),
    sample: str | None = typer.Option(
        None,
        "--sample",
        metavar="TEXT",
        help="show/encode: a sentence to normalise, encode and decode.",
    ),
) -> None:
    """Train, inspect and export tokenizers: the student's output units (char, BPE, or a teacher's).

    \b
    kdcache tokenizer train --text corpus/lm_text.txt --kind bpe --vocab-size 500 --out tok/
    kdcache tokenizer train --text corpus/lm_text.txt --kind phone --out tok-phone/
    kdcache tokenizer show tok/ --sample "In the beginning"
    kdcache tokenizer export path/to/model.gguf --out tok-smollm2/
    """
    from kdcache.data.manifest import ManifestError
    from kdcache.data.text import normalize_text
    from kdcache.data.tokenizer import Tokenizer, TokenizerError

    try:
        if action == "train":
            if not text or out is None:
                raise ValueError("train needs --text FILE (one or more) and --out DIR")
            if path is not None:
                raise ValueError("train takes no PATH argument; use --text and --out")
            refuse_overwrite(out, overwrite)
            texts = [t for t in (normalize_text(s) for s in _read_texts(text)) if t]
            if not texts:
                raise ValueError("no text found in " + ", ".join(map(str, text)))
            if kind == "char":
                tok = Tokenizer.build_char(texts)
                tok.save(out)
            elif kind == "phone":
                tok = Tokenizer.build_phone(texts)
                tok.save(out)
            else:
                tok = Tokenizer.train_bpe(texts, vocab_size, out)
            typer.echo(f"{out}: {tok!r} from {len(texts)} sentences")
            return
        if path is None:
            raise ValueError(f"{action} needs PATH (a tokenizer)")
        tok = Tokenizer.load(tokenizer_path(path))
        if action == "export":
            if out is None:
                raise ValueError("export needs --out DIR")
            refuse_overwrite(out, overwrite)
            tok.save(out)
            typer.echo(f"{out}: {tok!r}")
            return
        if action == "show":
            typer.echo(
                f"name        {tok.name}\nkind        {tok.kind}\nvocab_size  {tok.vocab_size}"
            )
            for k, v in tok.specials.items():
                piece = tok.id_to_piece(v) if v is not None else "-"
                typer.echo(f"{k + '_id':<12}{v} {piece}")
            typer.echo(f"hash        {tok.content_hash()}")
            first = [tok.id_to_piece(i) for i in range(min(tok.vocab_size, 40))]
            typer.echo("pieces      " + " ".join(first) + (" ..." if tok.vocab_size > 40 else ""))
        if sample is not None:
            norm = normalize_text(sample)
            ids = tok.encode(norm)
            typer.echo(f"normalised  {norm}\nids         {ids}")
            typer.echo("pieces      " + " ".join(tok.id_to_piece(i) for i in ids))
            typer.echo(f"decoded     {tok.decode(ids)}")
        elif action == "encode":
            raise ValueError("encode needs --sample TEXT")
    except (TokenizerError, ManifestError, ValueError, OSError) as e:
        _fail(e)


def tokenizer_path(path: str) -> str:
    """A tokenizer argument with the offline model aliases (``minilm``, ``smollm2``, as in
    ``kdcache build --model``) resolved to their installed files; anything else unchanged."""
    from kdcache.hub import OFFLINE_NAMES

    if path in OFFLINE_NAMES and not Path(path).exists():
        from kdcache.teachers.loading import resolve_model

        src = resolve_model(path)
        return str(Path(src.path) / src.gguf_file) if src.gguf_file else src.path
    return path


def _read_texts(paths: list[Path]):
    from kdcache.data.manifest import load_manifest

    for p in paths:
        if p.is_dir() or p.name.endswith((".jsonl", ".jsonl.gz")):
            for u in load_manifest(p):
                if u.text:
                    yield u.text
        else:
            yield from read_sentences(p)


def read_sentences(p: Path) -> list[str]:
    """The lines of a text file; a Kaldi ``text`` file (utterance ids first) loses its ids, with a
    note on stderr, so that the ids never become training text."""
    from kdcache.data.manifest import read_text_lines

    if not p.is_file():
        raise FileNotFoundError(f"--text {p}: no such file")
    lines, kaldi = read_text_lines(p)
    if kaldi:
        typer.echo(
            f"note: {p} is a Kaldi text file (utterance id first on each line): "
            f"the ids are left out",
            err=True,
        )
    return lines
