"""Typed configuration of a kdtrain run: dataclasses, YAML files and ``key=value`` overrides.

A run's configuration is one :class:`RunConfig` built in this order, later sources winning:

1. the dataclass defaults below (the papers' defaults for each recipe: the one place they are
   defined; losses.py's keyword defaults and the recipe sections of recipes/*.yaml equal them,
   tests/test_paper_defaults.py checks);
2. ``--config FILE`` (a YAML mapping with the same nesting, e.g. ``recipes/lst.yaml``);
3. ``--recipe NAME`` (sets ``recipe``);
4. ``key=value`` overrides on the command line, dotted for nested sections
   (``optim.lr=1e-3``, ``data.specaug.enabled=false``, ``data.speed_perturb=[0.9,1.0,1.1]``).

Unknown keys are rejected with a message that names the key and the keys that section knows, so a
typo never silently trains with a default. The resolved configuration is written to
``RUN_DIR/config.yaml`` and is what ``--resume`` and ``kdtrain eval`` read back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.student.model import StudentConfig
from kdcache.student.objectives import RECIPES  # noqa: F401  (the registry names the recipes)


class ConfigError(ValueError):
    """A configuration key or value is not valid; the message names it."""


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class SpecAugConfig:
    """SpecAugment (Park et al. 2019) masks, applied per utterance on the CPU side.

    Defaults are the LibriSpeech "LD" policy without time warping (also paper 004's setting:
    F=27, m_F=2, T=50, m_T=2, p=1.0).
    """

    enabled: bool = True
    num_freq_masks: int = 2
    freq_mask_width: int = 27  # F: a mask covers [0, F) channels
    num_time_masks: int = 2
    time_mask_width: int = 50  # T: a mask covers [0, T) frames ...
    time_mask_max_ratio: float = 1.0  # ... and at most this fraction of the utterance (p)


@dataclass
class DataConfig:
    """Batching, reading and augmentation of (features, cache targets) pairs."""

    max_frames: int = 20000  # per batch, counted padded: batch size x longest input
    max_utts: int = 128  # per batch, at most
    max_utt_frames: int = 3000  # longer utterances are skipped (with a warning)
    bucket_pool: int = 512  # utterances sorted by length together before cutting batches
    reader: str = "auto"  # "stream" (whole-chunk reads), "random" (per utterance), "auto"
    stream_min_utts: int = 2000  # "auto" streams from this many training utterances up
    shuffle_buffer: int = 1024  # stream reader: utterances shuffled in memory
    num_workers: int = 0  # DataLoader worker processes
    worker_threads: int = 1  # torch intra-op threads in each worker process
    prefetch_factor: int = 2
    cmvn: bool = True  # global mean/variance normalisation from the feature store's stats
    speed_perturb: list[float] = field(default_factory=list)  # e.g. [0.9, 1.0, 1.1]
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)


@dataclass
class OptimConfig:
    """Adam(W) with a warm-up schedule."""

    lr: float = 1e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    scheduler: str = "noam"  # "noam" (warm-up then 1/sqrt(step)), "warmup" (then constant)
    warmup_steps: int = 2500
    grad_clip: float = 5.0  # max global grad norm; 0 disables
    accum_steps: int = 1  # batches per optimizer step


@dataclass
class TrainConfig:
    """Loop, logging, checkpointing and precision."""

    max_steps: int = 50000  # optimizer steps
    seed: int = 1234
    log_every: int = 10  # rows in metrics.csv
    ckpt_every: int = 1000  # a killed run loses at most this many steps
    keep_checkpoints: int = 2
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "auto" (bf16 autocast on CUDA, off on CPU), "bf16", "off"
    progress: bool = True  # tqdm bar
    tensorboard: bool = False  # also log to RUN_DIR/tb when tensorboard is installed
    allow_missing: bool = False  # skip training utterances the cache lacks (with a warning)
    eval_every: int = 500  # with --dev-data: CTC-greedy dev WER/CER every this many steps (dev.csv)
    threads: int = 0  # torch intra-op threads of the training process; 0: torch's default


@dataclass
class LSTConfig:
    """Learn Spelling from Teachers (paper 001): decoder output, label interpolation.

    Loss on the decoder: (1-w) CE_ls(y, student) + w CE(teacher_T, student), eos gets no KD:
    the teacher is at temperature T, the student at T = 1 (losses.lst_loss).
    """

    kd_weight: float = 0.1  # w
    temperature: float = 5.0  # T; the cache's build temperature is re-tempered to it


@dataclass
class MultitaskConfig:
    """Multi-task KD (paper 000): a separate aux KD head on the decoder output.

    Decoder loss: lam CE(y, u_SL) + (1-lam) KL(teacher_T || u_KD).
    """

    lam: float = 0.5
    temperature: float = 1.0


@dataclass
class EssenceConfig:
    """Essence KD (paper 003): only the teacher's top-k "essence", renormalised.

    Decoder loss: alpha CE(y, student) + (1-alpha) CE(renormalised top-k teacher, student).
    """

    alpha: float = 0.5
    k: int = 0  # top entries kept; 0 = all the cache stores
    temperature: float = 1.0


@dataclass
class InterAEDConfig:
    """interAED KD (paper 002): aux attention decoders on CTC encoder layers, masked-LM targets.

    Loss: CTC + kd_weight * sum over layers of H(s, aux decoder), s = mix p~_{k,T} + (1-mix) y
    (plus the attention decoder's CE when model.decoder_layers > 0, weighted like ``none``).
    """

    layers: list[int] = field(default_factory=lambda: [6, -1])  # encoder layers, 1-based; -1 = last
    kd_weight: float = 1.0  # beta
    k: int = 8  # top masked-LM entries kept, renormalised
    temperature: float = 3.0
    mix: float = 0.9  # weight of the LM soft label against the one-hot reference


@dataclass
class CIFHKDConfig:
    """Hierarchical KD on a CIF model (paper 004): ACD on CIF outputs, LRD on decoder states.

    Loss: ce_weight CE + ctc_weight CTC + qua_weight quantity + acd_weight ACD + lrd_weight LRD
    (``cif_hkd.ctc_weight``, not the top-level ``ctc_weight`` of the attention-decoder recipes).
    """

    layer: int = -1  # teacher hidden layer in the cache; -1 = the last stored
    ce_weight: float = 1.0
    ctc_weight: float = 0.5
    qua_weight: float = 1.0
    # "utterance": |sum a - L| averaged over utterances (the CIF paper); "token": summed and
    # divided by the batch's tokens (FunASR's normalize_length), for long unit sequences such
    # as characters, where the per-utterance form's gradient swamps the others' under clipping
    qua_norm: str = "utterance"
    acd_weight: float = 1.0
    lrd_weight: float = 1.0
    tau: float = 0.02
    num_negatives: int = 700
    lrd_kind: str = "mse"  # "mse" (the paper's LRD) or "cosine" (ablation)


@dataclass
class HierarchicalConfig:
    """Hierarchical multi-task KD (paper 000, sec. 3.2): one KD output per teacher in the cache.

    Teachers in the student's units (same tokenizer hash) get an aux KD head on the main
    decoder's positions; teachers in other units (characters, phones, another BPE) get an aux
    attention decoder on the final encoder output, teacher-forced on the teacher's own tokens:

        L_dec = lam CE(y, u_SL) + (1-lam) sum_{t same} w_t KL(teacher_t || u_KD,t)
        L_t   = lam CE(teacher tokens, a_t) + (1-lam) KL(teacher_t || a_t)   (other units)
        loss  = ctc_weight CTC + (1-ctc_weight) [L_dec + sum_{t other} w_t L_t]

    The aux decoders are dropped for decoding and export (docs/training.md).
    """

    teachers: list[str] = field(default_factory=list)  # empty = every teacher of the cache(s)
    weights: list[float] = field(default_factory=list)  # empty = equal
    lam: float = 0.5
    temperature: float = 1.0
    aux_decoder_layers: int = 1  # layers of each other-units teacher's aux decoder


@dataclass
class RunConfig:
    """Everything that defines a run; saved as RUN_DIR/config.yaml."""

    recipe: str = "none"
    ctc_weight: float = 0.3  # joint CTC/attention: ctc_weight CTC + (1-ctc_weight) decoder loss
    label_smoothing: float = 0.1
    teacher: str = ""  # cache teacher the recipe reads; "" = the cache's only teacher
    model: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lst: LSTConfig = field(default_factory=LSTConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    essence: EssenceConfig = field(default_factory=EssenceConfig)
    interaed: InterAEDConfig = field(default_factory=InterAEDConfig)
    cif_hkd: CIFHKDConfig = field(default_factory=CIFHKDConfig)
    hierarchical: HierarchicalConfig = field(default_factory=HierarchicalConfig)

    def validate(self) -> RunConfig:
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r}: {msg}")

        check(self.recipe in RECIPES, "recipe", f"{self.recipe!r} is not one of {RECIPES}")
        check(0.0 <= self.ctc_weight <= 1.0, "ctc_weight", "must be in [0, 1]")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        check(
            self.data.reader in ("auto", "stream", "random"),
            "data.reader",
            "must be 'auto', 'stream' or 'random'",
        )
        check(self.data.max_frames > 0, "data.max_frames", "must be > 0")
        check(self.data.max_utts >= 1, "data.max_utts", "must be >= 1")
        check(self.data.max_utt_frames >= 1, "data.max_utt_frames", "must be >= 1")
        check(self.data.bucket_pool >= 1, "data.bucket_pool", "must be >= 1")
        check(self.data.stream_min_utts >= 0, "data.stream_min_utts", "must be >= 0")
        check(self.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        check(self.data.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        sa = self.data.specaug
        for key in ("num_freq_masks", "freq_mask_width", "num_time_masks", "time_mask_width"):
            check(getattr(sa, key) >= 0, f"data.specaug.{key}", "must be >= 0")
        check(
            0.0 <= sa.time_mask_max_ratio <= 1.0,
            "data.specaug.time_mask_max_ratio",
            "must be in [0, 1]",
        )
        check(self.data.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.data.worker_threads >= 1, "data.worker_threads", "must be >= 1")
        check(self.train.threads >= 0, "train.threads", "must be >= 0 (0: torch's default)")
        check(
            all(f > 0 for f in self.data.speed_perturb), "data.speed_perturb", "factors must be > 0"
        )
        check(
            self.optim.scheduler in ("noam", "warmup"),
            "optim.scheduler",
            "must be 'noam' or 'warmup'",
        )
        check(len(self.optim.betas) == 2, "optim.betas", "needs two values")
        check(all(0.0 <= b < 1.0 for b in self.optim.betas), "optim.betas", "must be in [0, 1)")
        check(
            self.optim.lr > 0 and math.isfinite(self.optim.lr),
            "optim.lr",
            "must be a finite number > 0",
        )
        check(self.optim.eps > 0, "optim.eps", "must be > 0")
        check(self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables)")
        check(self.optim.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
        check(self.train.max_steps >= 1, "train.max_steps", "must be >= 1")
        check(self.train.log_every >= 1, "train.log_every", "must be >= 1")
        check(self.train.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0 = all)")
        check(self.train.amp in ("auto", "bf16", "off"), "train.amp", "must be auto, bf16 or off")
        check(self.train.ckpt_every >= 1, "train.ckpt_every", "must be >= 1")
        check(self.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = never)")
        check(0.0 <= self.lst.kd_weight <= 1.0, "lst.kd_weight", "must be in [0, 1]")
        check(self.lst.temperature > 0, "lst.temperature", "must be > 0")
        check(0.0 <= self.multitask.lam <= 1.0, "multitask.lam", "must be in [0, 1]")
        check(self.multitask.temperature > 0, "multitask.temperature", "must be > 0")
        check(0.0 <= self.essence.alpha <= 1.0, "essence.alpha", "must be in [0, 1]")
        check(self.essence.k >= 0, "essence.k", "must be >= 0 (0 = all)")
        check(self.essence.temperature > 0, "essence.temperature", "must be > 0")
        check(self.interaed.kd_weight >= 0, "interaed.kd_weight", "must be >= 0")
        check(self.interaed.k >= 1, "interaed.k", "must be >= 1")
        check(self.interaed.temperature > 0, "interaed.temperature", "must be > 0")
        check(0.0 <= self.interaed.mix <= 1.0, "interaed.mix", "must be in [0, 1]")
        for key in ("ce_weight", "ctc_weight", "qua_weight", "acd_weight", "lrd_weight"):
            check(getattr(self.cif_hkd, key) >= 0, f"cif_hkd.{key}", "must be >= 0")
        check(
            self.cif_hkd.qua_norm in ("utterance", "token"),
            "cif_hkd.qua_norm",
            "must be utterance or token",
        )
        check(self.cif_hkd.tau > 0, "cif_hkd.tau", "must be > 0")
        check(self.cif_hkd.num_negatives >= 1, "cif_hkd.num_negatives", "must be >= 1")
        check(self.hierarchical.temperature > 0, "hierarchical.temperature", "must be > 0")
        check(
            self.cif_hkd.lrd_kind in ("mse", "cosine"), "cif_hkd.lrd_kind", "must be mse or cosine"
        )
        check(
            not self.hierarchical.weights
            or len(self.hierarchical.weights) == len(self.hierarchical.teachers),
            "hierarchical.weights",
            "needs one weight per entry of hierarchical.teachers",
        )
        check(0.0 <= self.hierarchical.lam <= 1.0, "hierarchical.lam", "must be in [0, 1]")
        check(
            all(w >= 0 for w in self.hierarchical.weights), "hierarchical.weights", "must be >= 0"
        )
        check(
            self.hierarchical.aux_decoder_layers >= 1,
            "hierarchical.aux_decoder_layers",
            "must be >= 1",
        )
        return self


# --------------------------------------------------------------------------------------------
# Building from mappings, files and overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int -> float allowed); return it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        kt, vt = (typing.get_args(tp) + (Any, Any))[:2]
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping (section), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    return value


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    known = [f.name for f in dataclasses.fields(cls)]
    hint = difflib.get_close_matches(key, known, n=1)
    where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
    msg = f"unknown config key {prefix + key!r}"
    if hint:
        msg += f" (did you mean {prefix + hint[0]!r}?)"
    return ConfigError(f"{msg}; {where} knows: {', '.join(known)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (lists, not tuples), for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-3" as a string; accept it as the number a user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.split("."), value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            d[k] = nxt
        d = nxt
    d[keys[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({what})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such config file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping")
    return data


def build_config(
    config_file: str | Path | None = None,
    recipe: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a RunConfig: defaults < ``base`` < ``config_file`` < ``recipe`` < overrides."""
    data: dict[str, Any] = dict(base or {})
    if config_file is not None:
        try:
            data = _merge(data, load_yaml(config_file))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(
                msg if msg.startswith(str(config_file)) else f"{config_file}: {msg}"
            ) from e
    if recipe is not None:
        data["recipe"] = recipe
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value)
    try:
        return from_dict(RunConfig, data).validate()
    except ConfigError as e:
        src = f" (from {config_file})" if config_file else ""
        raise ConfigError(f"{e}{src}") from e


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (tmp + rename, so a reader never sees half a file)."""
    import os

    import yaml

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a saved config.yaml back (``--resume``, ``kdtrain eval``), applying overrides."""
    return build_config(config_file=path, overrides=overrides)
