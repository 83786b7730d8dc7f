"""The acoustic-ensemble teacher (paper 003): N trained kdtrain students, their frame-level CTC
posteriors combined, stored as top-k + tail per encoder frame.

``kdcache build --teacher ensemble --model RUN --model RUN ... --data M --features STORE --out X``
runs every member over the feature store (each with the CMVN its run used: the store's global
statistics) and combines their per-frame CTC distributions p_m (weights w_m, normalised to sum 1):

* ``mean`` (default): p = sum_m w_m p_m, the arithmetic mean of probabilities (a "weighted
  mean" when ``--weights`` is given);
* ``product``: p proportional to prod_m p_m^{w_m}, the log-linear combination.

then applies the build temperature (p^{1/T}, renormalised) and stores the top k and the tail
mass per frame. Positions are encoder frames after the members' subsampling: the cache record
says ``units="frames"`` and ``frame_shift_ms = subsampling x`` the features' 10 ms. The stored
vocabulary is the members' CTC output (their tokenizer, blank included), so the record carries
their tokenizer hash. ``--hidden-layers -1`` also stores the members' mean final encoder output.

Members must share the tokenizer (content hash), the subsampling and the input features; a
member that differs is refused by name. Resumable (utterances committed before a kill are
skipped) and sliced by rank under torchrun like every build; ``input_hash`` is the hash of the
utterance's stored features, so a resume against changed features is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcache.teachers.base import BuildError
from kdcache.teachers.build import with_build_threads

log = logging.getLogger(__name__)

COMBINE = ("mean", "product")
FEATURE_SHIFT_MS = 10.0  # kdcache features: 25 ms windows every 10 ms (kdcache.data.features)


@dataclass
class Member:
    run_dir: Path
    model: torch.nn.Module
    step: int
    checkpoint: Path
    subsampling: int
    input_dim: int
    cmvn: bool
    tokenizer_hash: str
    d_model: int


def load_member(run_dir: str | Path, device: str = "cpu") -> Member:
    """A trained kdtrain run (its newest readable checkpoint), in eval mode, CTC path only."""
    from kdcache.student.config import load_config
    from kdcache.student.rundir import build_model, load_tokenizer, restore_model

    rd = Path(run_dir)
    if not (rd / "config.yaml").exists():
        raise BuildError(f"--model {str(rd)!r}: not a kdtrain run directory (no config.yaml)")
    cfg = load_config(rd / "config.yaml")
    tok = load_tokenizer(rd / "tokenizer")
    model = build_model(cfg)
    try:
        step, ckpt = restore_model(model, rd)
    except FileNotFoundError as e:
        raise BuildError(f"--model {str(rd)!r}: {e}") from None
    model.to(device).eval()
    return Member(
        run_dir=rd,
        model=model,
        step=step,
        checkpoint=Path(ckpt),
        subsampling=cfg.model.subsampling,
        input_dim=cfg.model.input_dim,
        cmvn=cfg.data.cmvn,
        tokenizer_hash=tok.content_hash(),
        d_model=cfg.model.d_model,
    )


@dataclass
class EnsembleTeacher:
    """Loaded members and how to combine them (see the module docstring)."""

    members: list[Member]
    k: int
    temperature: float = 1.0
    combine: str = "mean"
    weights: list[float] = field(default_factory=list)
    hidden: bool = False
    device: str = "cpu"
    tokenizer_id: str = ""
    vocab_size: int = 0
    kind: str = "ensemble"

    @classmethod
    def load(
        cls,
        run_dirs: list[str],
        *,
        k: int,
        temperature: float = 1.0,
        combine: str = "mean",
        weights: list[float] | None = None,
        hidden: bool = False,
        device: str = "cpu",
    ) -> EnsembleTeacher:
        if not run_dirs:
            raise BuildError("--teacher ensemble needs --model RUN_DIR for each member")
        if combine not in COMBINE:
            raise BuildError(f"--combine {combine!r} must be one of {', '.join(COMBINE)}")
        if temperature <= 0:
            raise BuildError(f"--temperature {temperature} must be > 0")
        if weights:
            if len(weights) != len(run_dirs):
                raise BuildError(
                    f"--weights: {len(weights)} weight(s) for {len(run_dirs)} member(s)"
                )
            if any(w <= 0 for w in weights):
                raise BuildError(f"--weights {weights}: every weight must be > 0")
        members = [load_member(rd, device) for rd in run_dirs]
        first = members[0]
        for m in members[1:]:
            for what, a, b in (
                ("tokenizer (content hash)", first.tokenizer_hash, m.tokenizer_hash),
                ("subsampling", first.subsampling, m.subsampling),
                ("input feature dimension", first.input_dim, m.input_dim),
                ("CMVN setting (data.cmvn)", first.cmvn, m.cmvn),
            ):
                if a != b:
                    raise BuildError(
                        f"member {str(m.run_dir)!r} differs from {str(first.run_dir)!r} in its "
                        f"{what}: {b} vs {a}; every member must share units, subsampling and "
                        f"features"
                    )
            if hidden and m.d_model != first.d_model:
                raise BuildError(
                    f"member {str(m.run_dir)!r}: encoder width {m.d_model} differs from "
                    f"{first.d_model}; --hidden-layers averages encoder outputs and needs one width"
                )
        vocab = first.model.cfg.vocab_size
        if not 1 <= k <= vocab:
            raise BuildError(f"--top-k {k} must be in 1..{vocab} (the members' CTC vocabulary)")
        w = list(weights) if weights else [1.0] * len(members)
        total = sum(w)
        return cls(
            members=members,
            k=k,
            temperature=float(temperature),
            combine=combine,
            weights=[x / total for x in w],
            hidden=hidden,
            device=device,
            tokenizer_id=str(first.run_dir / "tokenizer"),
            vocab_size=vocab,
        )

    @property
    def subsampling(self) -> int:
        return self.members[0].subsampling

    @property
    def hidden_layer(self) -> int:
        return int(self.members[0].model.cfg.num_layers)

    def model_hash(self) -> str:
        from kdcache.cache_format.spec import content_hash

        parts = [f"{self.combine}:{self.weights}"]
        parts += [content_hash(m.checkpoint.read_bytes()) for m in self.members]
        return content_hash("|".join(parts))

    def options(self) -> dict:
        return {
            "combine": self.combine,
            "weights": self.weights,
            "members": [
                {"run": str(m.run_dir), "checkpoint": m.checkpoint.name, "step": m.step}
                for m in self.members
            ],
            "subsampling": self.subsampling,
            "blank_id": int(self.members[0].model.cfg.blank_id),
        }

    @torch.inference_mode()
    def log_probs(
        self, feats: torch.Tensor, feat_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Combined per-frame log-probabilities [B, T', V] at temperature 1, encoder lengths [B]
        and (with ``hidden``) the members' mean encoder output [B, T', D]."""
        per, hid, lens = [], None, None
        for m in self.members:
            out = m.model(feats, feat_lens)
            per.append(out.ctc_logits.float().log_softmax(-1))
            if lens is None:
                lens = out.enc_lens
            elif not torch.equal(lens, out.enc_lens):  # same subsampling: cannot differ
                raise BuildError(f"member {str(m.run_dir)!r} gave other encoder lengths")
            if self.hidden:
                h = out.enc_out.float()
                hid = h if hid is None else hid + h
        lp = torch.stack(per)  # [M, B, T', V]
        w = torch.tensor(self.weights, dtype=lp.dtype, device=lp.device)[:, None, None, None]
        if self.combine == "mean":
            comb = torch.logsumexp(lp + w.log(), 0)
        else:
            comb = (lp * w).sum(0).log_softmax(-1)
        if hid is not None:
            hid = hid / len(self.members)
        return comb, lens, hid


@with_build_threads
def build_ensemble_cache(
    *,
    models: list[str],
    data: str,
    features: str,
    out: str,
    name: str | None = None,
    k: int = 8,
    temperature: float = 1.0,
    combine: str = "mean",
    weights: list[float] | None = None,
    hidden: bool = False,
    hidden_codec: str = "float16",
    logprob_keepbits: int | None = None,
    max_frames: int = 20000,
    device: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    shard_positions: int | None = None,
    progress: bool = True,
    threads: int | str = "auto",  # applied by with_build_threads
):
    """Build (or resume) the ensemble's frame-level targets for a manifest into a cache.

    Returns the :class:`kdcache.teachers.build.BuildSummary` (positions are frames).
    """
    from kdcache.cache_format import spec
    from kdcache.teachers.build import pick_device
    from kdcache.teachers.topk import topk_targets

    t0, c0 = time.monotonic(), time.process_time()
    name = check_frame_options(name or "ensemble", out, hidden_codec, logprob_keepbits)
    utts, store = open_frame_inputs(data, features, "ensemble")
    dev = pick_device(device)
    t = EnsembleTeacher.load(
        models,
        k=k,
        temperature=temperature,
        combine=combine,
        weights=weights,
        hidden=hidden,
        device=dev,
    )
    record = spec.TeacherRecord(
        name=name,
        kind="ensemble",
        model_id=",".join(str(m.run_dir) for m in t.members),
        model_hash=t.model_hash(),
        tokenizer_id=t.tokenizer_id,
        tokenizer_hash=t.members[0].tokenizer_hash,
        vocab_size=t.vocab_size,
        k=t.k,
        temperature=t.temperature,
        units="frames",
        frame_shift_ms=FEATURE_SHIFT_MS * t.subsampling,
        hidden_layers=(t.hidden_layer,) if hidden else (),
        hidden_dims={str(t.hidden_layer): t.members[0].d_model} if hidden else {},
        hidden_codec=hidden_codec,
        options=t.options(),
        **({"logprob_keepbits": logprob_keepbits} if logprob_keepbits is not None else {}),
    )

    def targets(u: str, logp: torch.Tensor, hid: torch.Tensor | None):
        top_ids, top_lp, tail = topk_targets(logp, t.k, t.temperature)
        hd = {t.hidden_layer: hid.cpu().numpy()} if hid is not None else {}
        return top_ids.cpu().numpy(), top_lp.cpu().numpy(), tail.cpu().numpy(), hd

    return build_frames(
        t, record, targets, utts=utts, store=store, out=out, max_frames=max_frames, dev=dev,
        rank=rank, world_size=world_size, shard_positions=shard_positions, progress=progress,
        t0=t0, c0=c0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# What every frame-level build shares (the ensemble here, kdcache.teachers.aligned_lm)


def check_frame_options(
    name: str, out: str, hidden_codec: str, logprob_keepbits: int | None
) -> str:
    """The checks of the options before anything is loaded; returns the checked teacher name."""
    from kdcache.cache_format import spec
    from kdcache.cache_format.writer import check_out_path

    if hidden_codec not in spec.HIDDEN_CODECS:
        raise BuildError(f"--hidden-codec {hidden_codec!r} must be one of {spec.HIDDEN_CODECS}")
    if hidden_codec == "pq":
        raise BuildError(
            "--hidden-codec pq is implemented for --teacher bert, causal_lm and lstm_lm; "
            "use float16 or int8 here"
        )
    if logprob_keepbits is not None and not 1 <= logprob_keepbits <= 10:
        raise BuildError(f"--logprob-keepbits {logprob_keepbits} must be in 1..10")
    name = spec.check_name(name, "teacher")
    check_out_path(out)
    return name


def open_frame_inputs(data: str, features: str, teacher: str):
    """(utterances of the manifest, the feature store holding every one of them)."""
    from kdcache.data.features import open_features
    from kdcache.data.manifest import load_manifest

    try:
        utts = load_manifest(data)
    except FileNotFoundError:
        raise BuildError(f"--data {data!r}: no such manifest") from None
    if not features:
        raise BuildError(f"--teacher {teacher} needs --features STORE (the acoustic models' input)")
    try:
        store = open_features(features)
    except FileNotFoundError:
        raise BuildError(f"--features {features!r}: no such feature store") from None
    missing = [u.id for u in utts if u.id not in store]
    if missing:
        raise BuildError(
            f"--features {features!r} lacks {len(missing)} utterance(s) of {data!r}, e.g. "
            f"{missing[0]!r}"
        )
    return utts, store


def build_frames(
    t: EnsembleTeacher,
    record,
    targets,
    *,
    utts,
    store,
    out: str,
    max_frames: int,
    dev: str,
    rank: int,
    world_size: int,
    shard_positions: int | None,
    progress: bool,
    t0: float,
    c0: float,
):
    """Run the acoustic model(s) of ``t`` over this rank's utterances and write, per
    utterance, what ``targets(utt_id, log_probs [n, V], hidden [n, D] | None)`` makes of its
    combined frame log-probabilities: ``(topk_ids, topk_logprobs, tail_logmass, hidden)``.

    Resumable: utterances committed before a kill are skipped (after checking that they were
    built from the same features). Returns the BuildSummary.
    """
    from tqdm import tqdm

    from kdcache.cache_format import spec
    from kdcache.cache_format.storage import is_url, open_storage
    from kdcache.cache_format.writer import CacheWriter
    from kdcache.data.text import normalize_text
    from kdcache.student.conformer import subsampled_lengths
    from kdcache.teachers.build import BuildSummary, rank_slice

    if store.num_mel_bins != t.members[0].input_dim:
        raise BuildError(
            f"--features {str(store.path)!r}: {store.num_mel_bins} mel bins, the model(s) were "
            f"trained on {t.members[0].input_dim}"
        )
    load_seconds = time.monotonic() - t0
    ss = t.subsampling
    lens_all = subsampled_lengths(torch.tensor([store.num_frames(u.id) for u in utts]), ss)
    n_out = {u.id: int(n) for u, n in zip(utts, lens_all.tolist(), strict=True)}
    too_short = [u for u in n_out if n_out[u] < 1]
    if too_short:
        raise BuildError(
            f"utterance {too_short[0]!r} is too short for the model's {ss}x subsampling "
            f"({store.num_frames(too_short[0])} frames); {len(too_short)} such"
        )
    texts = {u.id: normalize_text(u.text or "") for u in utts}
    mine = rank_slice([u.id for u in utts], [n_out[u.id] for u in utts], rank, world_size)
    mean = np.asarray(store.mean, np.float32) if t.members[0].cmvn else None
    std = np.maximum(np.asarray(store.std, np.float32), 1e-5) if t.members[0].cmvn else None
    wkw = {"shard_positions": shard_positions} if shard_positions else {}
    done = positions = 0
    with CacheWriter(out, record, rank=rank, **wkw) as writer:
        committed = writer.committed_utt_ids
        if committed:
            _check_not_stale(out, record.name, [u for u in mine if u in committed], store)
        todo = sorted((u for u in mine if u not in committed), key=lambda u: (n_out[u], u))
        resumed = len(mine) - len(todo)
        load_cpu = time.process_time() - c0
        bar = tqdm(
            total=sum(n_out[u] for u in todo),
            unit="frame",
            unit_scale=True,
            disable=not progress,
            desc=f"{record.name} r{rank}",
            dynamic_ncols=True,
        )
        start = time.monotonic()
        try:
            for ids, raw, x, fl in frame_batches(store, todo, max_frames, mean, std):
                comb, lens, hid = t.log_probs(x.to(dev), fl.to(dev))
                for i, u in enumerate(ids):
                    n = int(lens[i])
                    if n != n_out[u]:
                        raise BuildError(
                            f"utterance {u!r}: {n} encoder frames, expected {n_out[u]}"
                        )
                    top_ids, top_lp, tail, hd = targets(
                        u, comb[i, :n], hid[i, :n] if hid is not None else None
                    )
                    writer.add(
                        spec.UttTargets(
                            utt_id=u,
                            topk_ids=top_ids,
                            topk_logprobs=top_lp,
                            tail_logmass=tail,
                            hidden=hd,
                            token_ids=None,
                            text=texts[u],
                            input_hash=spec.content_hash(raw[i]),
                        )
                    )
                    done += 1
                    positions += n
                    bar.update(n)
        finally:
            bar.close()
    size = open_storage(out, read_only=True).size_tree() if not is_url(out) else 0
    return BuildSummary(
        cache=str(out),
        teacher=record.name,
        rank=rank,
        world_size=world_size,
        utterances_total=len(mine),
        utterances_done=done,
        utterances_resumed=resumed,
        utterances_skipped_bad=0,
        utterances_empty=0,
        positions=positions,
        unk_tokens=0,
        seconds=time.monotonic() - start,
        load_seconds=load_seconds,
        load_seconds_cpu=load_cpu,
        cache_bytes=size,
    )


def frame_batches(store, todo: list[str], max_frames: int, mean, std):
    """The frame builds' batches of ``todo`` (in that order, at most ``max_frames`` padded input
    frames each): ``(utterance ids, their stored features, the padded input [B, T, F] normalised
    by mean/std when given, lengths [B])``."""
    from kdcache.student.data import cut_batches

    for cut in cut_batches(todo, [store.num_frames(u) for u in todo], max_frames, 10_000):
        ids = [todo[i] for i in cut]
        raw = [np.asarray(store[u]) for u in ids]
        feats = [r.astype(np.float32) for r in raw]
        if mean is not None:
            feats = [(f - mean) / std for f in feats]
        fl = torch.tensor([f.shape[0] for f in feats])
        x = torch.zeros(len(feats), int(fl.max()), feats[0].shape[1])
        for i, f in enumerate(feats):
            x[i, : f.shape[0]] = torch.from_numpy(f)
        yield ids, raw, x, fl


def _check_not_stale(out: str, teacher: str, done: list[str], store) -> None:
    """Refuse to resume when committed utterances came from other features than the store's."""
    from kdcache.cache_format import content_hash
    from kdcache.teachers.build import stored_input_hashes

    stored = stored_input_hashes(out, teacher)
    for u in done:
        if u in stored and stored[u] != content_hash(np.asarray(store[u])):
            raise BuildError(
                f"utterance {u!r} already in {out} (teacher {teacher!r}) was built from other "
                f"features than {store.path if hasattr(store, 'path') else 'the store'}'s now: "
                f"build into a new cache or under another --name"
            )


__all__ = [
    "COMBINE",
    "EnsembleTeacher",
    "build_ensemble_cache",
    "build_frames",
    "check_frame_options",
    "frame_batches",
    "load_member",
    "open_frame_inputs",
]
