"""The build loop: run one teacher over a manifest's transcripts and write its targets to a cache.

Order of work: load the manifest, normalise and tokenise every transcript, take this rank's
slice, drop utterances the cache already holds (resume), sort the rest by length (longest
first), run the teacher in token-budget batches, and hand finished utterances to a writer thread
through a bounded queue, so compression and disk writes overlap the model.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from kdcache.teachers.base import BuildError

log = logging.getLogger(__name__)

TOKEN_TEACHERS = ("bert", "causal_lm", "lstm_lm")
# frame-level teachers: kdcache.teachers.ensemble and kdcache.teachers.aligned_lm
TEACHERS = (*TOKEN_TEACHERS, "ensemble", "aligned_lm")
KIND_OF = {"bert": "masked_lm", "causal_lm": "causal_lm", "lstm_lm": "lstm_lm"}
DEFAULT_BUDGET = {"cpu": 4096, "cuda": 65536}


@dataclass
class PreparedUtt:
    """One utterance ready for the teacher."""

    id: str
    text: str  # normalised
    token_ids: list[int]


@dataclass
class BuildSummary:
    """What a build did (printed by ``kdcache build``)."""

    cache: str
    teacher: str
    rank: int
    world_size: int
    utterances_total: int
    utterances_done: int
    utterances_resumed: int
    utterances_skipped_bad: int
    utterances_empty: int
    positions: int
    unk_tokens: int
    seconds: float
    load_seconds: float
    load_seconds_cpu: float
    cache_bytes: int
    bad_utterances: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # teacher-specific lines, printed last
    threads: int = 0  # torch intra-op threads the build ran with (--threads)

    @property
    def utt_per_s(self) -> float:
        return self.utterances_done / self.seconds if self.seconds else 0.0

    @property
    def positions_per_s(self) -> float:
        return self.positions / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(utt_per_s=self.utt_per_s, positions_per_s=self.positions_per_s)
        return d

    def lines(self) -> list[str]:
        return [
            f"cache      {self.cache}  (teacher {self.teacher!r}, rank {self.rank}/{self.world_size})",
            f"utterances {self.utterances_done} built, {self.utterances_resumed} already in the "
            f"cache, {self.utterances_skipped_bad} skipped (bad), {self.utterances_empty} empty "
            f"(0 positions), of {self.utterances_total} in this rank's slice",
            f"positions  {self.positions}  ({self.unk_tokens} unknown-token positions)",
            f"time       {self.seconds:.1f} s building ({self.load_seconds:.1f} s loading before): "
            f"{self.utt_per_s:.1f} utt/s, {self.positions_per_s:.0f} positions/s"
            + (f", {self.threads} torch thread(s)" if self.threads else ""),
            f"size       {self.cache_bytes / 1e6:.2f} MB on disk (whole cache)",
            *self.notes,
        ]


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` (this rank's LOCAL_RANK GPU under torchrun) when available, else ``cpu``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BuildError("--device cuda: no CUDA device is available")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def build_threads(threads: int | str | None, device: str) -> int:
    """``--threads``: a count >= 1, or ``auto`` (:func:`kdcache.threads.auto_build_threads` for
    the resolved ``device``); anything else is a BuildError naming --threads."""
    from kdcache.threads import auto_build_threads, parse_threads

    try:
        n = parse_threads(threads)
    except ValueError as e:
        raise BuildError(str(e)) from None
    return n if n is not None else auto_build_threads(device)


def with_build_threads(fn):
    """Run a build function (keyword arguments only, with ``device`` and ``threads``) under
    :func:`kdcache.threads.scoped_threads`: ``threads`` resolved for the resolved device (a bad
    value refused before anything loads), the previous thread settings restored afterwards, and
    the count recorded in the returned BuildSummary."""
    import functools
    import inspect

    device_default = inspect.signature(fn).parameters["device"].default

    @functools.wraps(fn)
    def run(*, threads: int | str = "auto", device: str = device_default, **kw):
        from kdcache.threads import scoped_threads

        n = build_threads(threads, pick_device(device))
        with scoped_threads(n):
            summary = fn(threads=n, device=device, **kw)
        summary.threads = n
        return summary

    return run


def load_teacher(
    teacher: str,
    model: str,
    *,
    k: int,
    temperature: float = 1.0,
    hidden_layers: tuple[int, ...] = (),
    mlm_mode: str = "masked",
    device: str = "cpu",
    max_len: int | None = None,
    mask_stride: int = 0,
):
    """Load a teacher adapter (masked_lm, causal_lm or lstm_lm) by its ``--teacher`` name."""
    from kdcache.teachers.loading import resolve_model

    if teacher in ("ensemble", "aligned_lm"):
        raise BuildError(f"--teacher {teacher} runs acoustic models: use build_{teacher}_cache")
    if teacher not in TEACHERS:
        raise BuildError(f"--teacher {teacher!r} must be one of {', '.join(TEACHERS)}")
    if k < 0:
        raise BuildError(f"--top-k {k} must be >= 0")
    if k == 0 and not hidden_layers:
        raise BuildError("--top-k 0 stores nothing: add --hidden-layers (e.g. -1)")
    if mask_stride and teacher != "bert":
        raise BuildError(f"--mask-stride applies to --teacher bert only, not {teacher}")
    if teacher == "lstm_lm":
        from kdcache.teachers.lstm_lm import LSTMTeacher

        if not os.path.isdir(model):
            raise BuildError(
                f"--model {model!r}: no such directory (make one with kdcache train-lm)"
            )
        try:
            t = LSTMTeacher(
                model, k=k, temperature=temperature, hidden_layers=hidden_layers, device=device
            )
        except BuildError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise BuildError(str(e)) from None
        # The tokenizer's directory (not its name), so `kdcache inspect --utt` can load it.
        from kdcache.teachers.lstm_lm import TOKENIZER_DIR

        t.model_id, t.tokenizer_id = model, os.path.join(model, TOKENIZER_DIR)
        return t
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file is noise next to ours
    try:
        source = resolve_model(model)
    except FileNotFoundError as e:
        raise BuildError(str(e)) from None
    try:
        if teacher == "bert":
            from kdcache.teachers.masked_lm import MaskedLMTeacher

            t = MaskedLMTeacher(
                source,
                k=k,
                temperature=temperature,
                hidden_layers=hidden_layers,
                mode=mlm_mode,
                device=device,
                max_len=max_len,
                mask_stride=mask_stride,
            )
        else:
            from kdcache.teachers.causal_lm import CausalLMTeacher

            t = CausalLMTeacher(
                source,
                k=k,
                temperature=temperature,
                hidden_layers=hidden_layers,
                device=device,
                max_len=max_len,
            )
    except BuildError:
        raise
    except OSError as e:
        raise BuildError(f"--model {model!r} could not be loaded: {e}") from None
    except ValueError as e:
        msg = str(e)
        if not msg.startswith("--"):  # transformers' words: say which option they are about
            msg = f"--model {model!r} as --teacher {teacher}: {msg}"
        raise BuildError(msg) from None
    t.model_id = t.tokenizer_id = source.model_id
    return t


def teacher_record(
    t,
    name: str,
    hidden_codec: str = "float16",
    chunk_positions: int | None = None,
    logprob_keepbits: int | None = None,
    samples: int = 0,
    sample_seed: int = 0,
    pq_subspaces: int = 0,
    topk_layout: str | None = None,
    logprob_rounding: str | None = None,
):
    """The TeacherRecord of a loaded teacher (format defaults where an argument is None);
    ``samples > 0``: sampled targets (t.k is then the width, min(samples, vocab_size));
    ``pq_subspaces``: M of hidden_codec "pq"."""
    from kdcache.cache_format import spec

    kw = {
        "chunk_positions": chunk_positions
        or spec.default_chunk_positions(logprob_rounding, t.hidden_layers)
    }
    if logprob_keepbits is not None:
        kw["logprob_keepbits"] = logprob_keepbits
    if topk_layout is not None:
        kw["topk_layout"] = topk_layout
    if logprob_rounding is not None:
        kw["logprob_rounding"] = logprob_rounding
    if samples:
        kw.update(targets="sampled", samples=samples, sample_seed=sample_seed)
    if hidden_codec == "pq" and t.hidden_layers:
        kw["pq_subspaces"] = pq_subspaces
    return spec.TeacherRecord(
        name=name,
        kind=t.kind,
        model_id=t.model_id,
        model_hash=t.model_hash(),
        tokenizer_id=t.tokenizer_id,
        tokenizer_hash=t.tokenizer_hash(),
        vocab_size=t.vocab_size,
        k=t.k,
        temperature=float(t.temperature),
        hidden_layers=t.hidden_layers,
        hidden_dims={str(a): b for a, b in t.hidden_dims.items()},
        hidden_codec=hidden_codec,
        options=t.options(),
        **kw,
    )


def prepare(
    utts,
    encode: Callable[[str], list[int]],
    *,
    skip_bad: bool = False,
) -> tuple[list[PreparedUtt], list[str]]:
    """Normalise and tokenise transcripts.

    An utterance without a transcript (``text`` None) is an error naming it, or, with
    ``skip_bad``, left out (its id returned in the second list). An empty transcript (empty after
    normalisation) is kept with zero positions: the cache then answers for it instead of raising
    KeyError, and a student sees a zero-length target.
    """
    from kdcache.data.text import normalize_text

    out, bad = [], []
    for u in utts:
        if u.text is None:
            if skip_bad:
                bad.append(u.id)
                continue
            raise BuildError(
                f"utterance {u.id!r} has no transcript (text); fix the manifest or "
                f"pass --skip-bad to leave such utterances out"
            )
        text = normalize_text(u.text)
        out.append(PreparedUtt(u.id, text, encode(text) if text else []))
    return out, bad


def rank_slice(items: list, costs: list[int], rank: int, world_size: int) -> list:
    """This rank's items: sorted by cost (then position, so every rank computes the same order),
    dealt out in snake order (0, 1, .., n-1, n-1, .., 0, ...), which keeps ranks' total cost
    within one item's cost of each other."""
    if not 0 <= rank < world_size:
        raise BuildError(f"rank {rank} is not in 0..{world_size - 1}")
    order = sorted(range(len(items)), key=lambda i: (-costs[i], i))
    mine = []
    for j, i in enumerate(order):
        r = j % world_size if (j // world_size) % 2 == 0 else world_size - 1 - j % world_size
        if r == rank:
            mine.append(items[i])
    return mine


@with_build_threads
def build_cache(
    *,
    teacher: str,
    model: str,
    data: str,
    out: str,
    name: str | None = None,
    k: int = 16,
    temperature: float = 1.0,
    hidden_layers: tuple[int, ...] = (),
    hidden_codec: str = "float16",
    pq_subspaces: int = 16,
    pq_train_positions: int = 20000,
    pq_seed: int = 0,
    logprob_keepbits: int | None = None,
    topk_layout: str | None = None,
    logprob_rounding: str | None = None,
    targets: str = "topk",
    samples: int = 32,
    sample_seed: int = 0,
    mlm_mode: str = "masked",
    mask_stride: int = 0,
    batch_tokens: int = 0,
    device: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    skip_bad: bool = False,
    shard_positions: int | None = None,
    max_len: int | None = None,
    queue_size: int = 256,
    progress: bool = True,
    loaded=None,
    threads: int | str = "auto",
) -> BuildSummary:
    """Build (or resume) one teacher's targets for a manifest into a cache.

    Args:
        teacher: ``bert``, ``causal_lm`` or ``lstm_lm``.
        model: Hub id, local directory, ``.gguf`` file, alias (``minilm``, ``smollm2``), or an
            LSTM LM directory.
        data: Manifest (anything :func:`kdcache.data.manifest.load_manifest` reads).
        out: Cache path.
        name: Teacher name in the cache (default: the ``teacher`` argument).
        k: Top entries per position (0: hidden states only).
        logprob_keepbits: Mantissa bits kept in the stored float16 log-probs (10: all; default:
            the format's, spec.DEFAULT_LOGPROB_KEEPBITS).
        topk_layout, logprob_rounding: How the top-k is stored (spec.TOPK_LAYOUTS,
            spec.LOGPROB_ROUNDINGS; None: the format's defaults, rank and fixed).
        targets: ``topk`` (the k most likely ids + tail bin) or ``sampled`` (``samples`` draws
            per position from the teacher, stored as distinct ids with log(count / samples) in
            arrays of width min(samples, vocab_size); ``k`` is then unused unless 0, which
            is refused). docs/losses.md has the estimator.
        samples: Draws per position (sampled targets).
        sample_seed: Seed of the draws; with the utterance id it fixes every position's draws.
        batch_tokens: Padded tokens per batch (0: 4096 on CPU, 65536 on GPU).
        rank, world_size: This worker's slice (torchrun sets RANK/WORLD_SIZE).
        skip_bad: Leave out utterances without a transcript instead of failing.
        shard_positions: Positions per committed shard (the most a killed build loses).
        max_len: Window length override (tests of long-input windows).
        loaded: An already-loaded teacher (benchmarks), instead of loading ``model``.
        threads: torch intra-op threads while the build runs, >= 1, or ``auto``
            (:func:`kdcache.threads.auto_build_threads`); the previous settings are restored
            afterwards (:func:`with_build_threads`).

    Returns:
        The build summary.
    """
    import torch
    from tqdm import tqdm

    from kdcache.cache_format import spec
    from kdcache.cache_format.storage import is_url, open_storage
    from kdcache.cache_format.writer import CacheWriter, check_out_path
    from kdcache.data.manifest import load_manifest

    t0, c0 = time.monotonic(), time.process_time()
    sampled = _check_targets_options(targets, samples, sample_seed, k, teacher)
    if sampled:
        from kdcache.cache_format.spec import DEFAULT_LOGPROB_KEEPBITS, sampled_count_problem

        why = sampled_count_problem(samples, logprob_keepbits or DEFAULT_LOGPROB_KEEPBITS)
        if why:
            raise BuildError(f"--samples {samples}: {why.split(': ', 1)[-1]} (--logprob-keepbits)")
    if hidden_codec not in spec.HIDDEN_CODECS:
        raise BuildError(f"--hidden-codec {hidden_codec!r} must be one of {spec.HIDDEN_CODECS}")
    if hidden_codec == "pq":
        _check_pq_options(hidden_layers, pq_subspaces, pq_train_positions)
    name = spec.check_name(name or teacher, "teacher")
    check_out_path(out)  # before loading a model for minutes
    try:
        utts = load_manifest(data)
    except FileNotFoundError:
        raise BuildError(f"--data {data!r}: no such manifest") from None
    dev = pick_device(device)
    t = loaded or load_teacher(
        teacher,
        model,
        k=1 if sampled else k,  # the width is min(samples, V), known once it is loaded
        temperature=temperature,
        hidden_layers=tuple(hidden_layers),
        mlm_mode=mlm_mode,
        device=dev,
        max_len=max_len,
        mask_stride=mask_stride,
    )
    if sampled:
        t.k = min(samples, t.vocab_size)
    load_seconds = time.monotonic() - t0
    budget = batch_tokens or DEFAULT_BUDGET["cuda" if dev.startswith("cuda") else "cpu"]
    prepared, bad = prepare(utts, t.encode, skip_bad=skip_bad)
    for b in bad:
        log.warning("utterance %r has no transcript: skipped (--skip-bad)", b)
    mine = rank_slice(prepared, [t.cost(len(p.token_ids)) for p in prepared], rank, world_size)
    if logprob_keepbits is not None and not 1 <= logprob_keepbits <= 10:
        raise BuildError(f"--logprob-keepbits {logprob_keepbits} must be in 1..10")
    unk = getattr(t, "unk_id", None)
    _check_unknown_tokens(prepared, unk, model)
    if hidden_codec == "pq":
        record = _pq_record(
            t, name, logprob_keepbits, samples if sampled else 0, sample_seed, pq_subspaces,
            topk_layout, logprob_rounding,
        )  # fmt: skip
    else:
        record = teacher_record(
            t,
            name,
            hidden_codec,
            logprob_keepbits=logprob_keepbits,
            samples=samples if sampled else 0,
            sample_seed=sample_seed,
            topk_layout=topk_layout,
            logprob_rounding=logprob_rounding,
        )
    wkw = {"shard_positions": shard_positions} if shard_positions else {}
    if hidden_codec == "pq":
        wkw.update(pq_train_positions=pq_train_positions, pq_seed=pq_seed)
    done = positions = empty = unk_count = 0
    with CacheWriter(out, record, rank=rank, **wkw) as writer:
        committed = writer.committed_utt_ids
        todo = [p for p in mine if p.id not in committed]
        resumed = len(mine) - len(todo)
        if resumed:
            _check_not_stale(out, name, [p for p in mine if p.id in committed])
        todo.sort(key=lambda p: (-len(p.token_ids), p.id))
        load_cpu = time.process_time() - c0
        total_pos = sum(len(p.token_ids) for p in todo)
        bar = tqdm(
            total=total_pos,
            unit="pos",
            unit_scale=True,
            disable=not progress,
            desc=f"{name} r{rank}",
            dynamic_ncols=True,
            smoothing=0.1,
        )
        q: queue.Queue = queue.Queue(maxsize=queue_size)
        errors: list[BaseException] = []

        def write_loop() -> None:
            # Whatever waits in the queue goes to the writer in one add_many (checked per batch:
            # the same result and errors as add() one at a time, less CPU per utterance).
            while True:
                batch = [q.get()]
                while batch[-1] is not None and len(batch) < 256:
                    try:
                        batch.append(q.get_nowait())
                    except queue.Empty:
                        break
                end = batch[-1] is None
                if end:
                    batch.pop()
                if batch and not errors:  # (after an error: drain so the producer never blocks)
                    try:
                        writer.add_many(batch)
                    except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                        errors.append(e)
                if end:
                    return

        thread = threading.Thread(target=write_loop, name="kdcache-writer", daemon=True)
        thread.start()
        start = time.monotonic()
        # On GPU, float32 matmuls outside autocast (LSTM, fp32 checkpoints) may use TF32.
        precision = torch.get_float32_matmul_precision()
        if dev.startswith("cuda"):
            torch.set_float32_matmul_precision("high")
        try:
            from kdcache.cache_format.spec import UttTargets

            sampler = None
            if sampled:
                from kdcache.teachers.base import Sampler

                sampler = Sampler(
                    samples,
                    lambda i, n: spec.sample_uniforms(sample_seed, todo[i].id, n, samples),
                )
            for i, tg in _run(t, todo, budget, sampler):
                p = todo[i]
                n = len(p.token_ids)
                ids = np.asarray(p.token_ids, dtype=np.int64)
                item = UttTargets(
                    utt_id=p.id,
                    topk_ids=tg.topk_ids,
                    topk_logprobs=tg.topk_logprobs,
                    tail_logmass=tg.tail_logmass,
                    hidden=tg.hidden,
                    token_ids=ids,
                    text=p.text,
                    input_hash=spec.content_hash(p.text),
                )
                while True:
                    if errors:
                        raise errors[0]
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                done += 1
                positions += n
                empty += n == 0
                if unk is not None:
                    unk_count += int((ids == unk).sum())
                bar.update(n)
                el = time.monotonic() - start
                bar.set_postfix_str(f"{done / el:.1f} utt/s", refresh=False)
        finally:
            q.put(None)
            thread.join()
            bar.close()
            torch.set_float32_matmul_precision(precision)
        if errors:
            raise errors[0]
    size = open_storage(out, read_only=True).size_tree() if not is_url(out) else 0
    return BuildSummary(
        cache=str(out),
        teacher=name,
        rank=rank,
        world_size=world_size,
        utterances_total=len(mine),
        utterances_done=done,
        utterances_resumed=resumed,
        utterances_skipped_bad=len(bad),
        utterances_empty=empty,
        positions=positions,
        unk_tokens=unk_count,
        seconds=time.monotonic() - start,
        load_seconds=load_seconds,
        load_seconds_cpu=load_cpu,
        cache_bytes=size,
        bad_utterances=bad,
    )


def _check_unknown_tokens(prepared: list[PreparedUtt], unk: int | None, model: str) -> None:
    """Before anything is written: refuse a teacher whose tokenizer maps every position to its
    unknown token (the cache would hold nothing but [UNK] targets: a wrong tokenizer, or text in
    a script it does not know); warn when some positions are unknown."""
    if unk is None:
        return
    total = sum(len(p.token_ids) for p in prepared)
    n = sum(int((np.asarray(p.token_ids) == unk).sum()) for p in prepared)
    if total and n == total:
        example = next((p for p in prepared if len(p.token_ids)), None)
        raise BuildError(
            f"--model {model!r}: its tokenizer maps all {total} token positions to its unknown "
            f"token (e.g. utterance {example.id!r}); the cache would hold only [UNK] targets: "
            f"use a teacher whose tokenizer covers this text"
        )
    if n:
        log.warning(
            "%d of %d token positions (%.1f%%) are the tokenizer's unknown token "
            "(characters it cannot encode); they keep their targets like any other token",
            n,
            total,
            100 * n / total,
        )


def stored_input_hashes(out: str, teacher: str) -> dict[str, str]:
    """utt id -> input_hash of every committed utterance of ``teacher`` in the cache ``out``."""
    from kdcache.cache_format import open_cache

    stored: dict[str, str] = {}
    for si in open_cache(out).shards.get(teacher, []):
        stored.update(zip(si.utt_ids, si.input_hash, strict=True))
    return stored


def _check_not_stale(out: str, teacher: str, done: list[PreparedUtt]) -> None:
    """Refuse to resume when committed utterances were built from other text than the manifest's
    now (their index ``input_hash`` differs): mixing the two would give stale targets."""
    from kdcache.cache_format import content_hash

    stored = stored_input_hashes(out, teacher)
    stale = [p.id for p in done if p.id in stored and stored[p.id] != content_hash(p.text)]
    if stale:
        raise BuildError(
            f"{len(stale)} utterance(s) already in {out} (teacher {teacher!r}) were built from "
            f"another transcript than the manifest's now, e.g. {stale[0]!r}: build into a new cache "
            f"or under another --name"
        )


def _run(t, todo: list[PreparedUtt], budget: int, sampler=None):
    from kdcache.teachers.base import run_rows

    return run_rows(t, ((i, p.token_ids) for i, p in enumerate(todo)), budget, sampler=sampler)


def _check_pq_options(hidden_layers, pq_subspaces: int, pq_train_positions: int) -> None:
    """--hidden-codec pq's options, and faiss, before a model is loaded."""
    if not hidden_layers:
        raise BuildError("--hidden-codec pq needs --hidden-layers (it encodes hidden states)")
    if pq_subspaces < 1:
        raise BuildError(f"--pq-subspaces {pq_subspaces} must be >= 1")
    if pq_train_positions < 256:
        raise BuildError(
            f"--pq-train-positions {pq_train_positions} must be >= 256 (one per centroid; "
            "20000 is the default)"
        )
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise BuildError(
            "--hidden-codec pq trains k-means codebooks with faiss, which is not installed: "
            "pip install 'kdcache[pq]' (or pip install faiss-cpu)"
        ) from None


def _pq_record(
    t, name, logprob_keepbits, samples, sample_seed, pq_subspaces, topk_layout, logprob_rounding
):
    """teacher_record for --hidden-codec pq, refusing a hidden size M does not divide."""
    from kdcache.cache_format.pq import check_subspaces

    for layer, dim in t.hidden_dims.items():
        why = check_subspaces(int(dim), pq_subspaces)
        if why:
            raise BuildError(f"--pq-subspaces {pq_subspaces}: layer {layer}: {why}")
    return teacher_record(
        t,
        name,
        "pq",
        logprob_keepbits=logprob_keepbits,
        samples=samples,
        sample_seed=sample_seed,
        pq_subspaces=pq_subspaces,
        topk_layout=topk_layout,
        logprob_rounding=logprob_rounding,
    )


def _check_targets_options(
    targets: str, samples: int, sample_seed: int, k: int, teacher: str
) -> bool:
    """``--targets``/``--samples``/``--sample-seed`` checked before anything loads; True for
    sampled targets."""
    if targets not in ("topk", "sampled"):
        raise BuildError(f"--targets {targets!r} must be topk or sampled")
    if targets == "topk":
        return False
    if teacher not in TOKEN_TEACHERS:
        raise BuildError(
            f"--targets sampled is implemented for --teacher {', '.join(TOKEN_TEACHERS)}, "
            f"not {teacher}"
        )
    if samples < 1:
        raise BuildError(f"--samples {samples} must be >= 1")
    if k == 0:
        raise BuildError("--targets sampled with --top-k 0: sampled targets need a width")
    if not 0 <= sample_seed < 1 << 63:
        raise BuildError(f"--sample-seed {sample_seed} must be in 0..2^63-1")
    return True
