"""Training objectives: one loss function per recipe, and the registry every recipe name comes from.

Recipes (``recipe=``), all on the same Conformer student (kdcache.student.model):

=============  ==============================================================================
none           ctc_weight CTC + (1 - ctc_weight) CE_ls(decoder)                   (baseline)
lst            ... decoder: (1-w) CE_ls + w H(teacher_T, student), T=5, w=0.1      (paper 001)
multitask      ... decoder: lam CE(y, u_SL) + (1-lam) KL(teacher_T || u_KD), aux head (000)
essence        ... decoder: alpha CE + (1-alpha) H(renormalised top-k teacher)     (paper 003)
interaed       CTC + beta sum_l H(s, aux decoder on encoder layer l)              (paper 002)
cif_hkd        CE(CIF decoder) + CTC + quantity + ACD (InfoNCE) + LRD (MSE)       (paper 004)
hierarchical   ... decoder: lam CE + (1-lam) sum_t w_t KL(teacher_t || u_KD,t)     (paper 000)
               + sum_t' w_t' [lam CE(t' tokens, a_t') + (1-lam) KL(teacher_t' || a_t')] for
               teachers t' in other units, each through its own aux decoder a_t'
=============  ==============================================================================

:data:`OBJECTIVES` maps each name to an :class:`Objective`: its loss function, what it needs
(a cache, the attention decoder, teacher hidden states, several teachers), the heads it adds to
the student, and a one-line description. ``config.RECIPES``, the cache checks of
``recipe.train``, ``recipe.resolve_model_config`` and ``kdtrain run --help`` all read it; adding a
recipe is one function and one entry here (plus its config section and recipes/NAME.yaml).

Each loss function is ``fn(mcfg, out, batch, ctx) -> (loss, terms)``: the student's config, its
forward output on ``batch``, the batch and the :class:`Context`; it returns the scalar to
backpropagate and the named terms (tensors) that go to metrics.csv, in column order.
``recipe.loss_step`` runs the forward pass and dispatches here.

Positions: the cache has one position per token of the normalised transcript; decoder output i
(i < L) predicts token i and lines up with cache position i; output L predicts eos and gets only
the recipe's hard-label term (no teacher has a position there: the losses' ``teacher_mask``).
CIF output i is token i too. A hierarchical teacher in other units (another tokenizer) has its
own aux decoder, teacher-forced on that teacher's token ids from the cache: aux output i (i < L_t)
is cache position i of that teacher, output L_t predicts the aux decoder's eos.
Every loss is a mean over valid positions.

Importing this module is cheap (no torch): ``kdtrain --help`` lists the recipes from it. The loss
functions import torch and kdcache.losses when they first run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kdcache.student.config import RunConfig
    from kdcache.student.data import Batch, TeacherBatch
    from kdcache.student.model import StudentConfig, StudentOutput

log = logging.getLogger(__name__)

Terms = dict[str, "torch.Tensor"]
LossFn = Callable[
    ["StudentConfig", "StudentOutput", "Batch", "Context"], "tuple[torch.Tensor, Terms]"
]
# (model config, run config, teacher records, other-units teachers) -> model config with the heads
StudentFn = Callable[["StudentConfig", "RunConfig", "dict[str, Any]", "list[str]"], "StudentConfig"]


@dataclass
class Context:
    """What a loss function needs besides the model's output and the batch."""

    cfg: RunConfig
    teachers: list[str]
    records: dict[str, Any]
    hidden_layer: int | None = None
    generator: torch.Generator | None = None
    own_units: list[str] = field(default_factory=list)  # hierarchical: teachers with aux decoders


@dataclass(frozen=True)
class Objective:
    """One recipe: its loss and what it needs from the run."""

    name: str
    loss: LossFn
    description: str  # one line, for ``kdtrain run --help``
    needs_cache: bool = True  # distils from a teacher-target cache (--cache)
    needs_decoder: bool = False  # distils into the attention decoder: model.decoder_layers >= 1
    several_teachers: bool = False  # reads several teachers, from one or several --cache paths
    needs_hidden: bool = False  # reads teacher hidden states (the cache must store them)
    student: StudentFn | None = None  # adds the heads the loss reads to the model config
    check_records: Callable[[RunConfig, dict[str, Any]], None] | None = None  # warn before training


# --------------------------------------------------------------------------------------------
# Shared pieces


def _ctc_loss(out: StudentOutput, batch: Batch, blank_id: int) -> torch.Tensor:
    import torch.nn.functional as F

    logp = out.ctc_logits.float().log_softmax(-1).transpose(0, 1)  # [T', B, V]
    targets = batch.tokens.masked_fill(batch.tokens < 0, 0)
    return F.ctc_loss(
        logp, targets, out.enc_lens, batch.token_lens, blank=blank_id,
        reduction="mean", zero_infinity=True,
    )  # fmt: skip


def _pad_positions(t: TeacherBatch, n: int) -> tuple[torch.Tensor, ...]:
    """Pad a TeacherBatch to n positions: from L tokens to the decoder's n = L+1 (eos), or from
    the cached frames to the encoder's padded frame count.

    Returns (topk_ids, topk_logprobs, tail_logmass, teacher_mask); the added positions (eos,
    padding) are outside teacher_mask, so the losses give them the hard-label term only.
    """
    import torch.nn.functional as F

    pad = n - t.topk_ids.shape[1]
    return (
        F.pad(t.topk_ids, (0, 0, 0, pad)),
        F.pad(t.topk_logprobs, (0, 0, 0, pad)),
        F.pad(t.tail_logmass, (0, pad)),
        F.pad(t.mask, (0, pad), value=False),
    )


def _to_encoder_frames(
    t: TeacherBatch, out: StudentOutput, batch: Batch, name: str
) -> tuple[torch.Tensor, ...]:
    """A frame-level TeacherBatch on the student's encoder frames; every utterance must have as
    many cached frames as the encoder gives (same subsampling, same features)."""
    import torch

    from kdcache.torch import TargetMismatchError

    have = t.mask.sum(1)
    bad = torch.nonzero(have != out.enc_lens.to(have.device)).flatten()
    if len(bad):
        i = int(bad[0])
        raise TargetMismatchError(
            f"utterance {batch.utt_ids[i]!r}: teacher {name!r} has {int(have[i])} frames, the "
            f"student's encoder {int(out.enc_lens[i])}; build the frame cache from members with "
            f"the student's subsampling on the same features (and no speed perturbation)"
        )
    # n >= the cached length: the longest utterance has n frames in both
    return _pad_positions(t, out.ctc_logits.shape[1])


def _kind(ctx: Context, name: str) -> str:
    """The teacher's target kind ("topk" or "sampled"; records without the field are top-k)."""
    return getattr(ctx.records.get(name), "targets", "topk")


def _token_mask(batch: Batch) -> torch.Tensor:
    import torch

    L = batch.tokens.shape[1]
    return torch.arange(L, device=batch.tokens.device)[None] < batch.token_lens[:, None]


def _decoder_targets(batch: Batch, mcfg: StudentConfig) -> torch.Tensor:
    from kdcache.student.model import decoder_targets

    return decoder_targets(batch.tokens, batch.token_lens, mcfg.eos_id)


def _joint(cfg: RunConfig, terms: Terms, att: torch.Tensor) -> tuple[torch.Tensor, Terms]:
    """The attention-decoder recipes' total: ctc_weight CTC + (1 - ctc_weight) decoder loss.

    The decoder term covers positions 0..L (eos included). Teacher position i is decoder output
    i; eos (output L) has no teacher position and gets the hard term only (teacher_mask)."""
    terms["att"] = att
    return cfg.ctc_weight * terms["ctc"] + (1.0 - cfg.ctc_weight) * att, terms


# --------------------------------------------------------------------------------------------
# One loss per recipe


def none(
    mcfg: StudentConfig, out: StudentOutput, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, Terms]:
    """Baseline: joint CTC / attention-decoder CE_ls, no teacher."""
    from kdcache import losses

    terms = {"ctc": _ctc_loss(out, batch, mcfg.blank_id)}
    att = losses.hard_ce(out.dec_logits, _decoder_targets(batch, mcfg), out.dec_mask,
                         label_smoothing=ctx.cfg.label_smoothing)  # fmt: skip
    return _joint(ctx.cfg, terms, att)


def lst(
    mcfg: StudentConfig, out: StudentOutput, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, Terms]:
    """Learn Spelling from Teachers (paper 001) on the attention decoder."""
    from kdcache import losses

    cfg = ctx.cfg
    terms = {"ctc": _ctc_loss(out, batch, mcfg.blank_id)}
    t = batch.targets[ctx.teachers[0]]
    ids, lp, tail, tmask = _pad_positions(t, out.dec_logits.shape[1])
    att = losses.lst_loss(
        out.dec_logits, _decoder_targets(batch, mcfg), ids, lp, tail, out.dec_mask,
        weight=cfg.lst.kd_weight, label_smoothing=cfg.label_smoothing,
        temperature=cfg.lst.temperature, build_temperature=t.temperature, teacher_mask=tmask,
        target_kind=_kind(ctx, ctx.teachers[0]),
    )  # fmt: skip
    return _joint(cfg, terms, att)


def multitask(
    mcfg: StudentConfig, out: StudentOutput, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, Terms]:
    """Multi-task KD (paper 000, eq. (4)): an aux KD head beside the decoder's output layer."""
    from kdcache import losses

    m = ctx.cfg.multitask
    terms = {"ctc": _ctc_loss(out, batch, mcfg.blank_id)}
    name = ctx.teachers[0]
    t = batch.targets[name]
    ids, lp, tail, tmask = _pad_positions(t, out.dec_logits.shape[1])
    att = losses.multitask_kd_loss(
        out.dec_logits, out.aux_kd_logits[name], _decoder_targets(batch, mcfg), ids, lp, tail,
        out.dec_mask, lam=m.lam, temperature=m.temperature, build_temperature=t.temperature,
        teacher_mask=tmask, target_kind=_kind(ctx, name),
    )  # fmt: skip
    return _joint(ctx.cfg, terms, att)


def essence(
    mcfg: StudentConfig, out: StudentOutput, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, Terms]:
    """Essence KD (paper 003): hard labels plus the renormalised top-k teacher.

    Token-level teacher (an LM): on the attention decoder, alpha CE + (1 - alpha) H(p~_k, q).
    Frame-level teacher (``kdcache build --teacher ensemble`` or ``aligned_lm``, units "frames"):
    on the CTC head, frame t of the cache against encoder frame t, with CTC as the hard-label
    term: ctc_weight [alpha CTC + (1 - alpha) H(p~_k, q_ctc)] + (1 - ctc_weight) CE_ls(decoder).
    An aligned-LM cache's blank frames (hard blanks) are outside the H term."""
    from kdcache import losses

    e = ctx.cfg.essence
    terms = {"ctc": _ctc_loss(out, batch, mcfg.blank_id)}
    name = ctx.teachers[0]
    t = batch.targets[name]
    if getattr(ctx.records.get(name), "units", "tokens") == "frames":
        ids, lp, tail, fmask = _to_encoder_frames(t, out, batch, name)
        if getattr(ctx.records.get(name), "kind", "") == "aligned_lm":
            from kdcache.teachers.aligned_lm import blank_frame_mask

            fmask = fmask & ~blank_frame_mask(ids, lp, mcfg.blank_id)  # LM knowledge: token frames
        terms["frame_kd"] = losses.sparse_kd_ce(
            out.ctc_logits.float(), ids, lp, tail, fmask, tail="renormalize",
            k=min(e.k, ids.shape[-1]) or None, teacher_temperature=e.temperature,
            build_temperature=t.temperature,
        )  # fmt: skip
        ctc_side = e.alpha * terms["ctc"] + (1.0 - e.alpha) * terms["frame_kd"]
        if out.dec_logits is None:
            return ctc_side, terms
        terms["att"] = losses.hard_ce(
            out.dec_logits, _decoder_targets(batch, mcfg), out.dec_mask,
            label_smoothing=ctx.cfg.label_smoothing,
        )  # fmt: skip
        cw = ctx.cfg.ctc_weight
        return cw * ctc_side + (1.0 - cw) * terms["att"], terms
    ids, lp, tail, tmask = _pad_positions(t, out.dec_logits.shape[1])
    att = losses.essence_kd_loss(
        out.dec_logits, _decoder_targets(batch, mcfg), ids, lp, tail, out.dec_mask,
        alpha=e.alpha, k=min(e.k, ids.shape[-1]) or None, temperature=e.temperature,
        build_temperature=t.temperature, teacher_mask=tmask,
    )  # fmt: skip
    return _joint(ctx.cfg, terms, att)


def interaed(
    mcfg: StudentConfig, out: StudentOutput, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, Terms]:
    """interAED KD (paper 002): CTC + aux decoders on encoder layers against masked-LM targets
    (+ the attention decoder's CE, weighted like ``none``, when the model has one)."""
    from kdcache import losses

    cfg, i = ctx.cfg, ctx.cfg.interaed
    terms = {"ctc": _ctc_loss(out, batch, mcfg.blank_id)}
    t = batch.targets[ctx.teachers[0]]
    kind = _kind(ctx, ctx.teachers[0])
    # sampled targets: all N draws (count / N estimates the untruncated teacher; a top-k cut of
    # draws would be biased), docs/losses.md
    k = None if kind == "sampled" else min(i.k, t.topk_ids.shape[-1])
    L = batch.tokens.shape[1]
    aux = [out.interaed_logits[layer][:, :L] for layer in sorted(out.interaed_logits)]
    terms["interaed"] = losses.interaed_kd_loss(
        aux, batch.tokens, t.topk_ids, t.topk_logprobs, t.tail_logmass, _token_mask(batch),
        k=k, temperature=i.temperature, build_temperature=t.temperature, mix=i.mix,
        target_kind=kind,
    )  # fmt: skip
    loss = terms["ctc"] + i.kd_weight * terms["interaed"]
    if out.dec_logits is not None:
        terms["att"] = losses.hard_ce(out.dec_logits, _decoder_targets(batch, mcfg), out.dec_mask,
                                      label_smoothing=cfg.label_smoothing)  # fmt: skip
        loss = loss + (1.0 - cfg.ctc_weight) / max(cfg.ctc_weight, 1e-6) * terms["att"]
    return loss, terms


def cif_hkd(
    mcfg: StudentConfig, out: StudentOutput, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, Terms]:
    """Hierarchical KD on a CIF model (paper 004): CE + CTC + quantity + ACD + LRD."""
    from kdcache import losses

    cfg, h = ctx.cfg, ctx.cfg.cif_hkd
    name = ctx.teachers[0]
    hidden = batch.targets[name].hidden[ctx.hidden_layer]
    tok_mask = _token_mask(batch)
    terms = {}
    terms["ce"] = losses.hard_ce(
        out.cif_logits, batch.tokens, tok_mask, label_smoothing=cfg.label_smoothing
    )
    terms["ctc"] = _ctc_loss(out, batch, mcfg.blank_id)
    terms["quantity"] = losses.cif_quantity_loss(
        out.alpha_sum.float(),
        batch.token_lens,
        reduction="token_mean" if h.qua_norm == "token" else "mean",
    )
    terms["acd"] = losses.acd_infonce_loss(
        out.acd_proj[name], hidden, tok_mask, tau=h.tau, num_negatives=h.num_negatives,
        generator=ctx.generator,
    )  # fmt: skip
    terms["lrd"] = losses.lrd_loss(out.lrd_proj[name], hidden, tok_mask, kind=h.lrd_kind)
    loss = (h.ce_weight * terms["ce"] + h.ctc_weight * terms["ctc"] + h.qua_weight * terms["quantity"]
            + h.acd_weight * terms["acd"] + h.lrd_weight * terms["lrd"])  # fmt: skip
    return loss, terms


def hierarchical(
    mcfg: StudentConfig, out: StudentOutput, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, Terms]:
    """Hierarchical multi-task KD (paper 000, sec. 3.2): one KD output per teacher.

    Same-units teachers share the decoder's positions: their KL terms are summed per position
    with the CE into L_dec. Each other-units teacher t' has its own positions and loss L_t'
    (its aux decoder). The teacher-level sum L_dec + sum_t' w_t' L_t' is
    ``losses.hierarchical_kd_loss``.
    """
    import torch

    from kdcache import losses
    from kdcache.student.model import decoder_targets

    h = ctx.cfg.hierarchical
    terms = {"ctc": _ctc_loss(out, batch, mcfg.blank_id)}
    dec_mask, n = out.dec_mask, out.dec_logits.shape[1]
    weights = list(h.weights) or [1.0 / len(ctx.teachers)] * len(ctx.teachers)
    sl = losses.hard_ce(out.dec_logits, _decoder_targets(batch, mcfg), dec_mask, reduction="none")
    per = h.lam * sl
    own_terms: list[tuple[float, torch.Tensor]] = []
    for w, name in zip(weights, ctx.teachers, strict=True):
        t = batch.targets[name]
        if name in ctx.own_units:
            # Other units: the aux decoder's own positions 0..L_t (eos at L_t, no teacher
            # there), the same multitask loss on one output layer: lam CE + (1-lam) KL.
            a_logits = out.aux_dec_logits[name]
            v_t = mcfg.aux_decoders[name]
            a_dt = decoder_targets(t.token_ids, t.token_lens, v_t + 1)
            a_mask = (
                torch.arange(a_logits.shape[1], device=a_dt.device)[None] <= t.token_lens[:, None]
            )
            a_ids, a_lp, a_tail, a_tmask = _pad_positions(t, a_logits.shape[1])
            a_loss = losses.multitask_kd_loss(
                a_logits, a_logits, a_dt, a_ids, a_lp, a_tail, a_mask, lam=h.lam,
                temperature=h.temperature, build_temperature=t.temperature,
                teacher_mask=a_tmask, target_kind=_kind(ctx, name),
            )  # fmt: skip
            terms[f"aux_{name}"] = a_loss.detach()
            own_terms.append((w, a_loss))
            continue
        ids, lp, tail, tmask = _pad_positions(t, n)
        kd = losses.sparse_kd_kl(
            out.aux_kd_logits[name], ids, lp, tail, tmask, student_temperature=h.temperature,
            teacher_temperature=h.temperature, build_temperature=t.temperature,
            reduction="none", target_kind=_kind(ctx, name),
        )  # fmt: skip
        terms[f"kd_{name}"] = (kd.sum() / tmask.sum().clamp(min=1)).detach()
        per = per + (1.0 - h.lam) * w * kd
    l_dec = (per * dec_mask).sum() / dec_mask.sum().clamp(min=1)
    att = losses.hierarchical_kd_loss([(1.0, l_dec), *own_terms])
    return _joint(ctx.cfg, terms, att)


# --------------------------------------------------------------------------------------------
# What each recipe adds to the student and checks before training


def _kd_heads(
    m: StudentConfig, cfg: RunConfig, records: dict[str, Any], own: list[str]
) -> StudentConfig:
    """multitask, hierarchical: an aux KD head on the decoder per teacher in the student's
    units, an aux decoder per teacher in other units."""
    return dataclasses.replace(
        m,
        aux_kd_heads={n: rec.vocab_size for n, rec in records.items() if n not in own},
        aux_kd_source="decoder",
        aux_decoders={n: records[n].vocab_size for n in own},
        aux_decoder_layers=cfg.hierarchical.aux_decoder_layers,
    )


def _interaed_decoders(
    m: StudentConfig, cfg: RunConfig, records: dict[str, Any], own: list[str]
) -> StudentConfig:
    return dataclasses.replace(m, interaed_layers=list(cfg.interaed.layers))


def cif_hidden_layer(cfg: RunConfig, record) -> int:
    """The teacher hidden layer cif_hkd distils (cif_hkd.layer; -1 = the last the cache stores)."""
    from kdcache.student.config import ConfigError

    if not record.hidden_layers:
        raise ConfigError(
            f"recipe cif_hkd needs teacher hidden states; teacher {record.name!r} stores none "
            f"(build the cache with hidden layers)"
        )
    layer = cfg.cif_hkd.layer
    if layer == -1:
        return int(record.hidden_layers[-1])
    if layer not in record.hidden_layers:
        raise ConfigError(
            f"cif_hkd.layer={layer}: teacher {record.name!r} stores layers {list(record.hidden_layers)}"
        )
    return int(layer)


def _cif_heads(
    m: StudentConfig, cfg: RunConfig, records: dict[str, Any], own: list[str]
) -> StudentConfig:
    ((name, rec),) = records.items()
    dim = rec.hidden_dims[str(cif_hidden_layer(cfg, rec))]
    # The CIF decoder is this recipe's decoder; an attention decoder would get no gradient
    # (wasted compute, and DDP refuses parameters without gradients).
    return dataclasses.replace(
        m, use_cif=True, decoder_layers=0, acd_proj={name: dim}, lrd_proj={name: dim},
        lrd_source="cif",
    )  # fmt: skip


def _check_frame_teacher(cfg: RunConfig, records: dict[str, Any]) -> None:
    """A frame-level teacher's frames are the student's encoder frames: no speed perturbation
    (it changes the frame count) and the members' subsampling."""
    from kdcache.student.config import ConfigError

    for name, rec in records.items():
        if getattr(rec, "units", "tokens") != "frames":
            continue
        if any(f != 1.0 for f in cfg.data.speed_perturb):
            raise ConfigError(
                f"teacher {name!r} has frame-level targets: data.speed_perturb="
                f"{list(cfg.data.speed_perturb)} would change the frame count; set it to []"
            )
        sub = (rec.options or {}).get("subsampling")
        if sub is not None and sub != cfg.model.subsampling:
            raise ConfigError(
                f"teacher {name!r} stores frames after {sub}x subsampling, the student has "
                f"model.subsampling={cfg.model.subsampling}"
            )


def _recipe_temperature(cfg: RunConfig) -> float | None:
    """The teacher temperature the recipe's loss asks for (None: it takes the cache's)."""
    section = getattr(cfg, cfg.recipe, None)
    return getattr(section, "temperature", None)


def check_sampled_targets(cfg: RunConfig, records: dict[str, Any], where: dict[str, str]) -> None:
    """Before training: refuse what a recipe cannot do with sampled targets, naming the cache
    and teacher. Essence KD is defined by the top k; no recipe can re-temper draws made at the
    cache's temperature (docs/losses.md). ``where``: teacher -> cache path."""
    from kdcache.losses import ESSENCE_SAMPLED_REFUSAL
    from kdcache.student.config import ConfigError

    for name, rec in records.items():
        if getattr(rec, "targets", "topk") != "sampled":
            continue
        at = f"cache {where.get(name, '?')}, teacher {name!r} (sampled targets, N={rec.samples})"
        if cfg.recipe == "essence":
            raise ConfigError(f"recipe essence: {at}: {ESSENCE_SAMPLED_REFUSAL}")
        want = _recipe_temperature(cfg)
        if want is not None and want != rec.temperature:
            raise ConfigError(
                f"recipe {cfg.recipe}: {at} were drawn at T={rec.temperature:g}; the recipe wants "
                f"T={want:g} and sampled targets cannot be re-tempered: rebuild with "
                f"--temperature {want:g} or set {cfg.recipe}.temperature={rec.temperature:g}"
            )


def _check_lst_temperature(cfg: RunConfig, records: dict[str, Any]) -> None:
    (rec,) = records.values()
    if getattr(rec, "targets", "topk") == "sampled":
        return  # check_sampled_targets: equal temperatures or refused
    if rec.temperature != cfg.lst.temperature:
        log.warning(
            "lst: the cache was built at T=%g, the recipe wants T=%g; re-tempering the rest bin "
            "is approximate (docs/losses.md): build LST caches at T=%g",
            rec.temperature, cfg.lst.temperature, cfg.lst.temperature,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The registry (its order is the order of config.RECIPES and of the CLI help)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("none", none, "joint CTC + attention-decoder CE, no teacher (baseline)",
                  needs_cache=False, needs_decoder=True),
        Objective("lst", lst, "Learn Spelling from Teachers (001): tempered teacher in the "
                  "decoder's CE target", needs_decoder=True, check_records=_check_lst_temperature),
        Objective("multitask", multitask, "multi-task KD (000): an aux KD head on the decoder",
                  needs_decoder=True, student=_kd_heads),
        Objective("essence", essence, "Essence KD (003): renormalised top-k teacher on the "
                  "decoder (an LM) or per frame on the CTC head (an ensemble, an aligned LM)", needs_decoder=True,
                  check_records=_check_frame_teacher),
        Objective("interaed", interaed, "interAED KD (002): aux decoders on CTC encoder layers",
                  student=_interaed_decoders),
        Objective("cif_hkd", cif_hkd, "hierarchical KD on a CIF model (004): teacher hidden "
                  "states (ACD, LRD)", needs_hidden=True, student=_cif_heads),
        Objective("hierarchical", hierarchical, "hierarchical multi-task KD (000): one KD output "
                  "per teacher, several --cache", needs_decoder=True, several_teachers=True,
                  student=_kd_heads),
    )
}  # fmt: skip

RECIPES: tuple[str, ...] = tuple(OBJECTIVES)


def recipes_help() -> str:
    """``kdtrain run --recipe`` help: every recipe with its one-line description."""
    return "; ".join(f"{o.name}: {o.description}" for o in OBJECTIVES.values()) + "."
