"""The kdtrain recipe: setup, the training loop, cleanup. One file.

The loss of each recipe (``recipe=``) is a function in kdcache.student.objectives, and its
registry ``OBJECTIVES`` says what the recipe needs (a cache, the attention decoder, hidden states,
several teachers) and which heads it adds to the student; this module reads it and never names a
recipe. :func:`loss_step` runs the student's forward pass and the recipe's objective. The terms
of every loss are logged separately in metrics.csv.

Determinism: given the same inputs, seed and data.num_workers, the losses of a run on CPU are a
pure function of the step, and a run resumed from a checkpoint logs exactly the numbers an
uninterrupted run logs (tests/test_train_recipes.py checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.student.checkpoint import (
    latest_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from kdcache.student.config import ConfigError, RunConfig, build_config, load_config, save_config
from kdcache.student.data import Batch, DataState, KDDataset, make_loader
from kdcache.student.model import StudentConfig
from kdcache.student.objectives import OBJECTIVES, Context, cif_hidden_layer
from kdcache.student.rundir import (  # noqa: F401  (build_model, restore_model: public here too)
    RUN_FILE,
    CsvLog,
    Split,
    build_model,
    decode_split,
    load_tokenizer,
    pick_device,
    prepare_split,
    read_metrics,
    restore_model,
)

log = logging.getLogger(__name__)

MIN_FRAMES = {2: 3, 4: 7, 8: 15}  # shortest input each conv subsampling accepts


@dataclass
class RunInputs:
    """What ``kdtrain run`` was given (paths may be None on --resume: run.json has them)."""

    out: Path
    data: Path | None = None
    features: Path | None = None
    tokenizer: Path | None = None
    # A local path or an fsspec URL (kept a str: Path() would turn s3://b/c into s3:/b/c);
    # several paths: their teachers are read together.
    cache: str | Path | list[str | Path] | None = None
    recipe: str | None = None
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    resume: bool = False
    allow_missing: bool = False
    dev_data: Path | None = None  # dev manifest: decoded every train.eval_every steps (dev.csv)
    dev_features: Path | None = None


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # loss of every step this process ran
    run_dir: Path


# --------------------------------------------------------------------------------------------
# Schedule


def noam_factor(step: int, warmup: int, kind: str) -> float:
    """LR multiplier at optimizer step ``step`` (1-based): linear warm-up to 1, then 1/sqrt
    decay ("noam", normalised so the peak is optim.lr) or constant ("warmup")."""
    step = max(1, step)
    warmup = max(1, warmup)
    if kind == "warmup":
        return min(1.0, step / warmup)
    return min(step / warmup, math.sqrt(warmup / step))


# --------------------------------------------------------------------------------------------
# Setup


def _resolve_config(inputs: RunInputs) -> tuple[RunConfig, RunInputs]:
    run_dir = Path(inputs.out)
    cfg_path = run_dir / "config.yaml"
    if inputs.resume:
        if not cfg_path.exists():
            raise FileNotFoundError(f"--resume: {cfg_path} not found; nothing to resume")
        saved = (
            json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).exists() else {}
        )

        def restore(v):  # run.json: a path, or a list of cache paths
            if not v:
                return None
            return [Path(x) for x in v] if isinstance(v, list) else Path(v)

        restored = {
            k: restore(saved.get(k))
            for k in ("data", "features", "tokenizer", "dev_data", "dev_features")
            if getattr(inputs, k) is None
        }
        if inputs.cache is None:  # cache paths stay str (they may be URLs)
            restored["cache"] = saved.get("cache") or None
        merged = dataclasses.replace(inputs, **restored)
        cfg = load_config(cfg_path, inputs.overrides)
        if inputs.recipe is not None and inputs.recipe != cfg.recipe:
            raise ConfigError(
                f"--resume: the run was started with recipe {cfg.recipe!r}, not {inputs.recipe!r}"
            )
        return cfg, merged
    if latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints: pass --resume to continue it or choose a new --out"
        )
    return build_config(inputs.config, inputs.recipe, inputs.overrides), inputs


def _cache_paths(cache) -> list[str]:
    """The --cache paths as str: local paths as given, fsspec URLs untouched."""
    if not cache:
        return []
    return [str(p) for p in (cache if isinstance(cache, (list, tuple)) else [cache])]


def _resolved_cache_path(p: str) -> str:
    """What run.json records for a cache: an absolute local path, or the URL as given."""
    from kdcache.cache_format.storage import is_url

    return p if is_url(p) else str(Path(p).resolve())


def _cache_path_of(cache, teacher: str) -> str:
    """The path of the cache that holds ``teacher`` (one of several --cache)."""
    pick = getattr(cache, "_cache", None)
    return str((pick(teacher) if pick else cache).path)


def _teacher_names(cfg: RunConfig, cache) -> list[str]:
    if OBJECTIVES[cfg.recipe].several_teachers:
        names = list(cfg.hierarchical.teachers) or sorted(cache.teachers)
    elif cfg.teacher:
        names = [cfg.teacher]
    elif len(cache.teachers) == 1:
        names = list(cache.teachers)
    else:
        raise ConfigError(
            f"the cache has teachers {sorted(cache.teachers)}: choose one with teacher=NAME"
        )
    for n in names:
        if n not in cache.teachers:
            raise ConfigError(
                f"teacher {n!r} is not in the cache (it has {sorted(cache.teachers)})"
            )
    return names


def own_units_teachers(cfg: RunConfig, tokenizer, records: dict) -> list[str]:
    """Teachers of the hierarchical recipe whose units are not the student's (their tokenizer
    hash differs): each is distilled through an aux decoder on its own tokens."""
    if not OBJECTIVES[cfg.recipe].several_teachers:
        return []
    h = tokenizer.content_hash()
    return [n for n, rec in records.items() if rec.tokenizer_hash != h]


def frame_teachers(cfg: RunConfig, records: dict) -> list[str]:
    """Teachers with frame-level targets (an ensemble), for the recipes that read them."""
    frames = [n for n, rec in records.items() if getattr(rec, "units", "tokens") == "frames"]
    if frames and cfg.recipe != "essence":
        raise ConfigError(
            f"teacher(s) {frames} store frame-level targets; recipe {cfg.recipe} distils "
            f"token-level targets (frame targets: --recipe essence)"
        )
    return frames


def resolve_model_config(cfg: RunConfig, tokenizer, input_dim: int, records: dict) -> StudentConfig:
    """Fill the student config from the tokenizer, the features and the recipe's heads."""
    m = dataclasses.replace(
        cfg.model,
        vocab_size=tokenizer.vocab_size,
        input_dim=input_dim,
        blank_id=tokenizer.blank_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )
    objective = OBJECTIVES[cfg.recipe]
    if objective.needs_decoder and m.decoder_layers < 1:
        raise ConfigError(
            f"recipe {cfg.recipe} distils into the attention decoder: set model.decoder_layers >= 1"
        )
    if objective.student is not None:
        m = objective.student(m, cfg, records, own_units_teachers(cfg, tokenizer, records))
    return StudentConfig.from_dict(m.to_dict())  # re-validate


# --------------------------------------------------------------------------------------------
# The loss step


def loss_step(
    model: torch.nn.Module, batch: Batch, ctx: Context
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward the student on ``batch`` and compute the recipe's loss (kdcache.student.objectives).

    Returns:
        (scalar loss to backpropagate, {term name: value} for logging).
    """
    objective = OBJECTIVES.get(ctx.cfg.recipe)
    if objective is None:
        raise ConfigError(f"unknown recipe {ctx.cfg.recipe!r}")
    mcfg = unwrap(model).cfg
    aux_tokens = {
        n: (batch.targets[n].token_ids, batch.targets[n].token_lens) for n in ctx.own_units
    }
    out = model(
        batch.feats, batch.feat_lens, batch.tokens, batch.token_lens, aux_tokens=aux_tokens or None
    )
    loss, terms = objective.loss(mcfg, out, batch, ctx)
    return loss, {k: float(v.detach()) for k, v in terms.items()}


# --------------------------------------------------------------------------------------------
# Logging


MetricsLog = CsvLog  # RUN_DIR/metrics.csv


# --------------------------------------------------------------------------------------------
# Train


def _pick_reader(cfg: RunConfig, cache, teachers: list[str], n_utts: int, world: int) -> str:
    """Resolve data.reader. Streaming splits the cache's chunks among world x workers shards,
    so it needs several chunks per shard; random access works for any size (docs/training.md).
    Several caches (--cache repeated) are read with random access."""
    if cache is None:
        return "random"
    if not cache.supports_stream:  # several caches (MultiCache)
        if cfg.data.reader == "stream":
            raise ConfigError("data.reader=stream reads one cache; several --cache paths need "
                              "data.reader=random (or auto)")  # fmt: skip
        return "random"
    shards = world * max(1, cfg.data.num_workers)
    groups = len(cache.chunk_groups(teachers[0]))
    if cfg.data.reader == "stream" and groups < shards:
        raise ConfigError(
            f"data.reader=stream: the cache has {groups} chunk(s) for {shards} data shards "
            f"({world} rank(s) x {max(1, cfg.data.num_workers)} worker(s)); use data.reader=random "
            f"or fewer data.num_workers"
        )
    if cfg.data.reader != "auto":
        return cfg.data.reader
    return "stream" if n_utts >= cfg.data.stream_min_utts and groups >= 4 * shards else "random"


def _dist_setup() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _gather(obj: Any, world: int) -> list[Any]:
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train(inputs: RunInputs) -> TrainResult:
    """Set up and run (or resume) a kdtrain run; returns when train.max_steps is reached."""
    cfg, inputs = _resolve_config(inputs)
    if cfg.train.threads <= 0:  # torch's default ($OMP_NUM_THREADS, else every core)
        return _train(cfg, inputs)
    from kdcache.threads import scoped_threads

    with scoped_threads(cfg.train.threads):  # restored afterwards (tests train in one process)
        return _train(cfg, inputs)


def _train(cfg: RunConfig, inputs: RunInputs) -> TrainResult:
    run_dir = Path(inputs.out)
    for what in ("data", "features", "tokenizer"):
        if getattr(inputs, what) is None:
            raise ConfigError(f"--{what} is required")
    objective = OBJECTIVES[cfg.recipe]
    needs_cache = objective.needs_cache
    if needs_cache and not inputs.cache:
        raise ConfigError(f"recipe {cfg.recipe!r} distils from a cache: pass --cache")
    cache_paths = _cache_paths(inputs.cache)
    if needs_cache and len(cache_paths) > 1 and not objective.several_teachers:
        several = ", ".join(o.name for o in OBJECTIVES.values() if o.several_teachers)
        raise ConfigError(f"recipe {cfg.recipe!r} reads one teacher: pass one --cache (several "
                          f"caches are for recipe {several})")  # fmt: skip
    rank, world, local_rank = _dist_setup()
    is_main = rank == 0
    device = pick_device(cfg.train.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")

    # ---- data: manifest, tokens, features, cache
    tok = load_tokenizer(inputs.tokenizer)
    try:
        split = prepare_split(inputs.data, inputs.features, tok, what="training")
        dev = None
        if inputs.dev_data is not None or inputs.dev_features is not None:
            if inputs.dev_data is None or inputs.dev_features is None:
                raise ConfigError("--dev-data and --dev-features go together")
            dev = prepare_split(inputs.dev_data, inputs.dev_features, tok, what="dev")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    texts, tokens, store = split.texts, split.tokens, split.store
    # The fastest speed factor shortens an utterance; it must still survive the subsampling.
    min_frames = math.ceil(MIN_FRAMES[cfg.model.subsampling] * max([1.0, *cfg.data.speed_perturb]))
    num_frames = {u: store.num_frames(u) for u in texts}
    train_ids = [
        u for u in texts
        if len(tokens[u]) > 0 and min_frames <= num_frames[u] <= cfg.data.max_utt_frames
    ]  # fmt: skip
    if len(train_ids) < len(texts):
        log.warning("skipping %d utterances: empty transcript, shorter than %d or longer than "
                    "data.max_utt_frames=%d frames", len(texts) - len(train_ids), min_frames,
                    cfg.data.max_utt_frames)  # fmt: skip
    teachers: list[str] = []
    records: dict[str, Any] = {}
    own_units: list[str] = []
    frame_units: list[str] = []
    cache = None
    if needs_cache:
        from kdcache.student.checks import check_cache
        from kdcache.student.data import open_caches

        try:
            cache = open_caches(cache_paths)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        teachers = _teacher_names(cfg, cache)
        records = {n: cache.teachers[n] for n in teachers}
        own_units = own_units_teachers(cfg, tok, records)
        if own_units:
            log.info("hierarchical: teacher(s) %s use other units than the student's tokenizer; "
                     "each gets an aux decoder on its own tokens", own_units)  # fmt: skip
        frame_units = frame_teachers(cfg, records)
        train_ids = check_cache(
            cache, teachers, tok, train_ids, tokens,
            allow_missing=inputs.allow_missing or cfg.train.allow_missing, own_units=own_units,
            frame_units=frame_units,
        )  # fmt: skip
    elif inputs.cache is not None:
        log.info("recipe %s: --cache %s is not read", cfg.recipe, inputs.cache)
    hidden_layer = cif_hidden_layer(cfg, records[teachers[0]]) if objective.needs_hidden else None
    if records:
        from kdcache.student.objectives import check_sampled_targets

        check_sampled_targets(cfg, records, {n: _cache_path_of(cache, n) for n in records})
    if objective.check_records is not None:
        objective.check_records(cfg, records)

    # ---- model, optimizer, schedule (resolved model config goes into config.yaml)
    cfg = dataclasses.replace(
        cfg, model=resolve_model_config(cfg, tok, store.num_mel_bins, records)
    )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        tok.save(run_dir / "tokenizer")
        paths = {k: str(Path(getattr(inputs, k)).resolve()) if getattr(inputs, k) else None
                 for k in ("data", "features", "tokenizer", "dev_data", "dev_features")}  # fmt: skip
        resolved = [_resolved_cache_path(p) for p in cache_paths]
        paths["cache"] = (resolved[0] if len(resolved) == 1 else resolved) if resolved else None
        tmp = run_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(paths, indent=1) + "\n")
        os.replace(tmp, run_dir / RUN_FILE)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg).to(device)
    # fused=True: one kernel over all parameters. The per-tensor default loop cost 0.4 s a step
    # for the 5M-parameter default student on CPU (fused: 0.01 s), a third of the step time.
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=True,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: noam_factor(s + 1, cfg.optim.warmup_steps, cfg.optim.scheduler)
    )
    step = 0
    elapsed = 0.0  # training seconds (data + forward + backward + update; not dev decoding)
    data_state = DataState(num_workers=cfg.data.num_workers)
    torch.manual_seed(cfg.train.seed + 1 + rank)  # dropout etc. differ per rank
    np.random.seed((cfg.train.seed + rank) % 2**32)
    found = load_latest(run_dir, map_location=device) if inputs.resume else None
    ckpt = found[0] if found is not None else None
    if inputs.resume and ckpt is None:
        log.warning("--resume: %s has no checkpoint yet; starting from step 0", run_dir)
    if found is not None:
        state = found[1]
        if state.get("world_size", 1) != world:
            raise ConfigError(
                f"--resume: the checkpoint was written by {state.get('world_size', 1)} rank(s); "
                f"resume with the same number (got {world})"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        elapsed = float(state.get("elapsed", 0.0))
        data_state = DataState.from_dict(state["data"][rank])
        if data_state.num_workers != cfg.data.num_workers:
            raise ConfigError(
                f"--resume: the checkpoint was written with data.num_workers="
                f"{data_state.num_workers}; resume with the same value (got {cfg.data.num_workers})"
            )
        set_rng_state(state["rng"][rank])
        log.info("resumed %s at step %d", ckpt, step)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    reader = _pick_reader(cfg, cache, teachers, len(train_ids), world)
    dataset = KDDataset(
        train_ids, tokens, num_frames, str(inputs.features),
        (cache_paths if len(cache_paths) > 1 else cache_paths[0])
        if needs_cache else None, teachers,
        {n: ([hidden_layer] if hidden_layer is not None else []) for n in teachers},
        cfg.data, pad_id=tok.pad_id, seed=cfg.train.seed, rank=rank, world_size=world,
        reader=reader, state=data_state, train=True,
        temperatures={n: r.temperature for n, r in records.items()}, texts=texts,
        own_units=own_units, frame_units=frame_units,
    )  # fmt: skip
    loader = make_loader(dataset)
    ctx = Context(cfg, teachers, records, hidden_layer, own_units=own_units)

    # ---- loop
    metrics = MetricsLog(run_dir / "metrics.csv", step if ckpt is not None else None, is_main)
    dev_log = CsvLog(
        run_dir / "dev.csv", step if ckpt is not None else None, is_main and dev is not None
    )
    tb = None
    if is_main and cfg.train.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            log.warning("train.tensorboard: tensorboard is not installed; metrics.csv only")
    from tqdm import tqdm

    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not (is_main and cfg.train.progress),
               desc=f"kdtrain {cfg.recipe}", dynamic_ncols=True)  # fmt: skip
    losses_seen: list[float] = []
    accum = cfg.optim.accum_steps
    model.train()
    it = iter(loader)
    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total, terms_sum, n_utts, n_frames = 0.0, {}, 0, 0
            for micro in range(accum):
                batch = next(it)
                data_state.advance(batch)
                batch = batch.to(device)
                sync = micro == accum - 1 or world == 1
                ctx_sync = contextlib.nullcontext() if sync else model.no_sync()
                with ctx_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss, terms = loss_step(model, batch, ctx)
                    (loss / accum).backward()
                total += float(loss.detach()) / accum
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v / accum
                n_utts += len(batch.utt_ids)
                n_frames += batch.num_frames
            if cfg.optim.grad_clip > 0:
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                )
            else:
                grad_norm = float("nan")
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"step {step + 1}: loss is {total}; lower optim.lr or check the data"
                )
            if world > 1:  # log the mean over ranks, not rank 0's share
                import torch.distributed as dist

                t = torch.tensor([total, *terms_sum.values()], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                t = (t / world).tolist()
                total, terms_sum = t[0], dict(zip(terms_sum, t[1:], strict=True))
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            losses_seen.append(total)
            bar.update(1)
            elapsed += time.perf_counter() - t0
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                row = {"step": step, "loss": total, **terms_sum, "lr": lr, "grad_norm": grad_norm,
                       "utts": n_utts, "frames": n_frames,
                       "sec_per_step": time.perf_counter() - t0}  # fmt: skip
                metrics.write(row)
                bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(k, v, step)
            if (
                dev is not None
                and is_main
                and cfg.train.eval_every > 0
                and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps)
            ):
                res = _dev_eval(unwrap(model), dev, tok, cfg, device)
                dev_log.write({"step": step, "train_seconds": round(elapsed, 2), **res})
                bar.write(
                    f"step {step}: dev WER {100 * res['dev_wer']:.2f}% CER "
                    f"{100 * res['dev_cer']:.2f}% (ctc greedy, {elapsed / 60:.1f} min)"
                )
                model.train()
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
                _checkpoint(
                    run_dir, step, model, opt, sched, data_state, cfg, world, is_main, elapsed
                )
    finally:
        bar.close()
        metrics.close()
        dev_log.close()
        if tb is not None:
            tb.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if is_main:
        tmp = run_dir / "train_summary.json.tmp"
        tmp.write_text(
            json.dumps(
                {
                    "step": step,
                    "train_seconds": round(elapsed, 2),
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                }
            )
            + "\n"
        )
        os.replace(tmp, run_dir / "train_summary.json")
    return TrainResult(step=step, losses=losses_seen, run_dir=run_dir)


def _dev_eval(model, dev: Split, tok, cfg: RunConfig, device) -> dict[str, float]:
    """CTC-greedy WER/CER of ``model`` on the dev split (cheap enough to run during training).
    Leaves the model in eval mode; RNG state is not touched (decoding draws nothing)."""
    from kdcache.student.decode import DecodeConfig
    from kdcache.student.evaluate import score

    model.eval()
    hyps = decode_split(model, dev, tok, DecodeConfig(method="ctc_greedy"), device,
                        max_frames=cfg.data.max_frames, max_utts=cfg.data.max_utts,
                        cmvn=cfg.data.cmvn)  # fmt: skip
    s = score([dev.texts[u] for u in dev.utt_ids], [hyps[u] for u in dev.utt_ids])
    return {"dev_wer": s["wer"], "dev_cer": s["cer"]}


def _checkpoint(
    run_dir, step, model, opt, sched, data_state, cfg, world, is_main, elapsed: float = 0.0
) -> None:
    datas = _gather(data_state.to_dict(), world)
    rngs = _gather(rng_state(), world)
    if not is_main:
        return
    save_checkpoint(
        run_dir,
        step,
        {
            "step": step,
            "model": unwrap(model).state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "data": datas,
            "rng": rngs,
            "world_size": world,
            "elapsed": elapsed,
            "config": dataclasses.asdict(cfg),
        },
        keep=cfg.train.keep_checkpoints,
    )
