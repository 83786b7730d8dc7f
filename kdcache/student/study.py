"""``kdtrain study``: every distillation recipe against the identical baseline, several seeds.

A study plan (YAML, e.g. ``recipes/plans/cpu.yaml``) names the data, the arms and the seeds::

    name: cpu-demo
    seeds: [1, 2, 3]
    steps: 600                      # optimizer steps of every run (identical for every arm)
    baseline: none                  # the arm every other arm is compared with
    data:                           # paths relative to --root
      train: corpus/train
      train_features: corpus/feats/train.fbank
      dev: corpus/dev
      dev_features: corpus/feats/dev.fbank
      test: corpus/test
      test_features: corpus/feats/test.fbank
      tokenizer: char
    decode: {method: attention_beam, beam: 4, ctc_weight: 0.3}
    arms:
      - {name: none, config: recipes/cpu/none.yaml}
      - {name: lst, config: recipes/cpu/lst.yaml, cache: [lstm_t5.kdc], overrides: []}

Every (arm, seed) is one ``kdtrain run`` with ``train.seed=SEED`` (so the same seed gives every
arm the same initial weights of the shared parts and the same batches) and ``train.max_steps``,
followed by ``kdtrain eval`` on dev and test. Runs are resumable: a finished run has
``study_done.json`` and is skipped; a killed run continues from its last checkpoint
(``--resume``). ``jobs`` runs go side by side, each with ``cores / jobs`` threads.

What comes out (``--out``): ``study.json`` (per arm and seed: dev/test WER and CER, steps,
training seconds, caches and teachers, config hash, commit, machine), ``study.md`` (the table:
mean +- sd per arm, paired differences against the baseline's same seed, a 95% bootstrap
interval of the mean difference over test utterances) and ``curves.png`` (dev CER against step).

Statistics (docs/training.md, "The study"): the paired difference of a seed is arm WER minus
baseline WER of the same seed. The bootstrap resamples *test utterances* with replacement (the
same draw for both arms and every seed), pools the seeds' errors and reports the 2.5th and
97.5th percentiles of ``sum(errors_arm - errors_base) / sum(reference length)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.student.config import ConfigError

DONE = "study_done.json"


# --------------------------------------------------------------------------------------------
# Plan


@dataclass
class Arm:
    name: str
    config: str  # recipe YAML (relative to the plan file's directory or absolute)
    recipe: str | None = None  # --recipe (default: the config's)
    cache: list[str] = field(default_factory=list)  # relative to --root
    overrides: list[str] = field(default_factory=list)
    decode: dict[str, Any] = field(default_factory=dict)  # over the plan's (e.g. method: cif)


@dataclass
class Plan:
    name: str
    seeds: list[int]
    steps: int
    data: dict[str, str]
    arms: list[Arm]
    baseline: str = "none"
    decode: dict[str, Any] = field(
        default_factory=lambda: {"method": "attention_beam", "beam": 4, "ctc_weight": 0.3}
    )
    eval_every: int = 100
    overrides: list[str] = field(default_factory=list)  # applied to every arm
    path: Path | None = None

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"study {self.name!r}: no arm named {name!r}")


# decode: kdtrain eval's options; lm is a `kdcache train-lm` directory relative to --root
DECODE_KEYS = {"method", "beam", "ctc_weight", "device", "lm", "lm_weight"}
DATA_KEYS = ("train", "train_features", "dev", "dev_features", "test", "test_features", "tokenizer")


def load_plan(path: str | Path) -> Plan:
    """Read and check a study plan; errors name the file and the key."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the study plan: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study plan is a YAML mapping")
    known = {
        "name",
        "seeds",
        "steps",
        "data",
        "arms",
        "baseline",
        "decode",
        "eval_every",
        "overrides",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; a plan knows {sorted(known)}")
    data = raw.get("data") or {}
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{path}: data needs {missing}")
    arms = []
    for i, a in enumerate(raw.get("arms") or []):
        if not isinstance(a, dict) or "name" not in a or "config" not in a:
            raise ConfigError(f"{path}: arms[{i}] needs a name and a config")
        extra = sorted(set(a) - {"name", "config", "recipe", "cache", "overrides", "decode"})
        if extra:
            raise ConfigError(f"{path}: arms[{i}] ({a['name']}): unknown keys {extra}")
        arm_decode = a.get("decode") or {}
        bad = sorted(set(arm_decode) - DECODE_KEYS) if isinstance(arm_decode, dict) else ["?"]
        if bad:
            raise ConfigError(
                f"{path}: arms[{i}] ({a['name']}): decode: unknown keys {bad}; it knows "
                f"{sorted(DECODE_KEYS)}"
            )
        cache = a.get("cache") or []
        arms.append(
            Arm(
                str(a["name"]),
                str(a["config"]),
                a.get("recipe"),
                [cache] if isinstance(cache, str) else list(cache),
                [str(o) for o in a.get("overrides") or []],
                dict(arm_decode),
            )
        )
    if not arms:
        raise ConfigError(f"{path}: the plan has no arms")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: arm names repeat: {names}")
    plan = Plan(name=str(raw.get("name", path.stem)), seeds=[int(s) for s in raw.get("seeds", [1, 2, 3])],
                steps=int(raw.get("steps", 600)), data={k: str(v) for k, v in data.items()},
                arms=arms, baseline=str(raw.get("baseline", "none")),
                decode=dict(raw.get("decode") or Plan.__dataclass_fields__["decode"].default_factory()),
                eval_every=int(raw.get("eval_every", 100)),
                overrides=[str(o) for o in raw.get("overrides") or []], path=path)  # fmt: skip
    if plan.baseline not in names:
        raise ConfigError(f"{path}: baseline {plan.baseline!r} is not an arm ({names})")
    extra = sorted(set(plan.decode) - DECODE_KEYS)
    if extra:
        raise ConfigError(f"{path}: decode: unknown keys {extra}; it knows {sorted(DECODE_KEYS)}")
    if ("lm" in plan.decode) != ("lm_weight" in plan.decode):
        raise ConfigError(f"{path}: decode: lm (an LM directory under --root) needs lm_weight")
    return plan


# --------------------------------------------------------------------------------------------
# Running


def _config_path(plan: Plan, arm: Arm) -> Path:
    p = Path(arm.config)
    if p.is_absolute() or p.exists():
        return p
    return (plan.path.parent / p) if plan.path else p


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}"


def train_command(plan: Plan, arm: Arm, seed: int, root: Path, out: Path) -> list[str]:
    d = plan.data
    rd = run_dir(out, arm.name, seed)
    cmd = [sys.executable, "-m", "kdcache.student", "run", "--out", str(rd)]
    if (rd / "config.yaml").exists():
        return [*cmd, "--resume", f"train.max_steps={plan.steps}"]
    cmd += [
        "--config",
        str(_config_path(plan, arm)),
        "--data",
        str(root / d["train"]),
        "--features",
        str(root / d["train_features"]),
        "--tokenizer",
        str(root / d["tokenizer"]),
        "--dev-data",
        str(root / d["dev"]),
        "--dev-features",
        str(root / d["dev_features"]),
    ]
    if arm.recipe:
        cmd += ["--recipe", arm.recipe]
    for c in arm.cache:
        cmd += ["--cache", str(root / c)]
    return [
        *cmd,
        *plan.overrides,
        *arm.overrides,
        f"train.seed={seed}",
        f"train.max_steps={plan.steps}",
        f"train.eval_every={plan.eval_every}",
        "train.progress=false",
    ]


def arm_decode(plan: Plan, arm: Arm | None) -> dict[str, Any]:
    """The decoding of ``arm``: the plan's, with the arm's own keys over it (a CIF arm decodes
    with ``method: cif``)."""
    return {**plan.decode, **(arm.decode if arm else {})}


def eval_command(plan: Plan, rd: Path, split: str, root: Path, arm: Arm | None = None) -> list[str]:
    """The `kdtrain eval` of one finished run on ``split`` (dev or test) with the arm's decoding."""
    dec = arm_decode(plan, arm)
    ev = [
        sys.executable,
        "-m",
        "kdcache.student",
        "eval",
        "--run",
        str(rd),
        "--data",
        str(root / plan.data[split]),
        "--features",
        str(root / plan.data[f"{split}_features"]),
        "--decode",
        str(dec.get("method", "attention_beam")),
        "--beam",
        str(dec.get("beam", 4)),
        "--ctc-weight",
        str(dec.get("ctc_weight", 0.3)),
        "--out",
        str(rd / f"eval-{split}"),
        "--device",
        str(dec.get("device", "auto")),
    ]
    if "lm" in dec:
        ev += ["--lm", str(root / dec["lm"]), "--lm-weight", str(dec["lm_weight"])]
    return ev


def _run_one(plan: Plan, arm: Arm, seed: int, root: Path, out: Path, threads: int) -> dict:
    rd = run_dir(out, arm.name, seed)
    if (rd / DONE).exists():
        return json.loads((rd / DONE).read_text())
    rd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = rd / "study.log"
    t0 = time.time()
    with open(log, "a") as f:
        cmd = train_command(plan, arm, seed, root, out)
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0:
            raise RuntimeError(
                f"study arm {arm.name} seed {seed}: kdtrain run failed "
                f"(exit {r.returncode}); see {log}"
            )
        for split in ("dev", "test"):
            ev = eval_command(plan, rd, split, root, arm)
            f.write("$ " + " ".join(ev) + "\n")
            f.flush()
            r = subprocess.run(ev, stdout=f, stderr=subprocess.STDOUT, env=env)
            if r.returncode != 0:
                raise RuntimeError(
                    f"study arm {arm.name} seed {seed}: kdtrain eval on {split} "
                    f"failed (exit {r.returncode}); see {log}"
                )
    res = collect_run(rd)
    res["wall_seconds"] = round(time.time() - t0, 1)
    tmp = rd / (DONE + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, rd / DONE)
    return res


def collect_run(rd: Path) -> dict:
    """What one finished run contributes to study.json."""
    import yaml

    from kdcache.student.rundir import RUN_FILE

    out: dict[str, Any] = {}
    for split in ("dev", "test"):
        r = json.loads((rd / f"eval-{split}" / "results.json").read_text())
        out[f"{split}_wer"], out[f"{split}_cer"] = r["wer"], r["cer"]
        out["steps"] = r["step"]
    summ = rd / "train_summary.json"
    if summ.exists():
        out["train_seconds"] = json.loads(summ.read_text()).get("train_seconds")
    cfg_text = (rd / "config.yaml").read_text()
    cfg = yaml.safe_load(cfg_text)
    cfg_no_seed = dict(cfg, train={k: v for k, v in cfg["train"].items() if k != "seed"})
    out["config_hash"] = hashlib.sha256(
        json.dumps(cfg_no_seed, sort_keys=True).encode()
    ).hexdigest()[:12]
    out["recipe"] = cfg["recipe"]
    out["seed"] = cfg["train"]["seed"]
    paths = json.loads((rd / RUN_FILE).read_text())
    cache = paths.get("cache")
    out["caches"] = [] if not cache else ([cache] if isinstance(cache, str) else cache)
    out["teachers"] = _teachers(out["caches"])
    return out


def _teachers(caches: Sequence[str]) -> list[dict]:
    res = []
    for c in caches:
        try:
            from kdcache.cache_format import open_cache

            cache = open_cache(c)
            for name, rec in cache.teachers.items():
                res.append(
                    {
                        "cache": c,
                        "name": name,
                        "kind": getattr(rec, "kind", None),
                        "model": getattr(rec, "model_id", None),
                        "temperature": rec.temperature,
                        "top_k": getattr(rec, "top_k", None),
                    }
                )
        except Exception as e:  # noqa: BLE001  (a description; never fail the study on it)
            res.append({"cache": c, "error": str(e)})
    return res


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def commit() -> str | None:
    try:
        src = Path(__file__).resolve().parents[2]
        r = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "kdcache"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_study(
    plan: Plan,
    root: Path,
    out: Path,
    *,
    jobs: int = 1,
    arms: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Train and evaluate every (arm, seed) not yet done, then write the summary files."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [(a, s) for a in plan.arms if not arms or a.name in arms for s in plan.seeds]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    errors = []
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = {pool.submit(_run_one, plan, a, s, root, out, threads): (a.name, s) for a, s in todo}
        for fut in cf.as_completed(futs):
            arm, seed = futs[fut]
            try:
                r = fut.result()
                if progress:
                    print(
                        f"[study] {arm} seed {seed}: test WER {100 * r['test_wer']:.2f}% "
                        f"CER {100 * r['test_cer']:.2f}%",
                        flush=True,
                    )
            except Exception as e:  # noqa: BLE001  (report every failed run, keep the rest)
                errors.append(str(e))
                print(f"[study] {e}", file=sys.stderr, flush=True)
    summary = summarize(plan, root, out)
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed: " + "; ".join(errors))
    return summary


# --------------------------------------------------------------------------------------------
# Statistics


def edit_errors(ref: str, hyp: str, unit: str) -> tuple[int, int]:
    """(edit distance, reference length) in words (``unit="word"``) or characters."""
    from rapidfuzz.distance import Levenshtein  # jiwer's own dependency

    a = ref.split() if unit == "word" else list(ref)
    b = hyp.split() if unit == "word" else list(hyp)
    return int(Levenshtein.distance(a, b)), len(a)


def paired_differences(arm: dict[int, float], base: dict[int, float]) -> dict[int, float]:
    """Per seed: arm value minus the baseline's value of the same seed (seeds in both)."""
    return {s: arm[s] - base[s] for s in sorted(arm) if s in base}


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def seed_t_ci(diffs: Sequence[float]) -> tuple[float, float, float] | None:
    """95% t-interval of the mean paired difference over seeds: (mean, lower, upper).

    The seeds are the samples (mean +- t_{0.975, n-1} sd / sqrt(n)), so the interval covers
    run-to-run variation that the utterance bootstrap (`bootstrap_ci`) holds fixed. None with
    fewer than 2 seeds."""
    d = np.asarray(list(diffs), dtype=np.float64)
    if d.size < 2:
        return None
    m, sd = float(d.mean()), float(d.std(ddof=1))
    t = _T975[d.size - 2] if d.size - 1 <= len(_T975) else 1.96
    half = t * sd / math.sqrt(d.size)
    return m, m - half, m + half


def bootstrap_ci(
    arm_errors: np.ndarray,
    base_errors: np.ndarray,
    ref_lens: np.ndarray,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """95% (1 - alpha) bootstrap interval of the pooled error-rate difference arm - base.

    Args:
        arm_errors, base_errors: [seeds, utterances] edit errors per utterance.
        ref_lens: [utterances] reference lengths (words or characters).

    Returns:
        (observed difference, lower, upper): utterances are resampled with replacement, the same
        draw for both arms and every seed; seeds are pooled.
    """
    arm_errors = np.asarray(arm_errors, dtype=np.float64)
    base_errors = np.asarray(base_errors, dtype=np.float64)
    ref_lens = np.asarray(ref_lens, dtype=np.float64)
    if arm_errors.shape != base_errors.shape or arm_errors.shape[-1] != ref_lens.shape[0]:
        raise ValueError("bootstrap_ci: arm, base and ref_lens must cover the same utterances")
    n_seeds, n = arm_errors.shape
    diff = (arm_errors - base_errors).sum(0)  # [utterances], pooled over seeds
    observed = float(diff.sum() / (n_seeds * ref_lens.sum()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    stats = diff[idx].sum(1) / (n_seeds * ref_lens[idx].sum(1))
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return observed, float(lo), float(hi)


def _per_utt_errors(rd: Path, split: str, unit: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = [
        json.loads(x) for x in (rd / f"eval-{split}" / "hyp.jsonl").read_text().splitlines() if x
    ]
    rows.sort(key=lambda r: r["utt_id"])
    errs, lens = zip(*(edit_errors(r["ref"], r["hyp"], unit) for r in rows), strict=True)
    return [r["utt_id"] for r in rows], np.asarray(errs), np.asarray(lens)


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(plan: Plan, root: Path, out: Path) -> dict:
    """Collect finished runs into study.json, study.md and curves.png."""
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, dict]] = {}
    for a in plan.arms:
        for s in plan.seeds:
            rd = run_dir(out, a.name, s)
            if (rd / DONE).exists():
                runs.setdefault(a.name, {})[s] = json.loads((rd / DONE).read_text())
    base = runs.get(plan.baseline, {})
    stats: dict[str, dict] = {}
    for name, per_seed in runs.items():
        st: dict[str, Any] = {"seeds": sorted(per_seed)}
        for key in ("dev_wer", "dev_cer", "test_wer", "test_cer"):
            st[key] = _mean_sd([per_seed[s][key] for s in sorted(per_seed)])
        if name != plan.baseline and base:
            for key in ("test_wer", "test_cer", "dev_wer", "dev_cer"):
                st[f"paired_{key}"] = paired_differences(
                    {s: r[key] for s, r in per_seed.items()}, {s: r[key] for s, r in base.items()}
                )
                if key.startswith("test_"):
                    st[f"seed_t_{key}"] = seed_t_ci(st[f"paired_{key}"].values())
            seeds = [s for s in sorted(per_seed) if s in base]
            if seeds:
                for unit, key in (("word", "test_wer"), ("char", "test_cer")):
                    a_err, b_err, lens = [], [], None
                    for s in seeds:
                        ids_a, ea, la = _per_utt_errors(run_dir(out, name, s), "test", unit)
                        ids_b, eb, _ = _per_utt_errors(run_dir(out, plan.baseline, s), "test", unit)
                        if ids_a != ids_b:
                            raise ValueError(
                                f"arm {name} seed {s}: test utterances differ from the baseline's"
                            )
                        a_err.append(ea)
                        b_err.append(eb)
                        lens = la
                    st[f"bootstrap_{key}"] = bootstrap_ci(np.stack(a_err), np.stack(b_err), lens)
        stats[name] = st
    doc = {
        "study": plan.name,
        "plan": str(plan.path) if plan.path else None,
        "root": str(root),
        "steps": plan.steps,
        "seeds": plan.seeds,
        "baseline": plan.baseline,
        "decode": plan.decode,
        "commit": commit(),
        "machine": machine(),
        "arms": {
            a.name: {
                "config": a.config,
                "recipe": a.recipe,
                "cache": a.cache,
                "overrides": a.overrides,
                "decode": arm_decode(plan, a),
            }
            for a in plan.arms
        },
        "runs": {n: {str(s): r for s, r in v.items()} for n, v in runs.items()},
        "stats": stats,
    }
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "study.json")
    (out / "study.md").write_text(format_table(plan, stats, runs))
    try:
        plot_curves(plan, out, out / "curves.png")
    except ImportError:
        pass
    return doc


def format_table(plan: Plan, stats: dict, runs: dict) -> str:
    pct = 100.0
    lines = [
        f"Study `{plan.name}`: {plan.steps} steps per run, seeds {plan.seeds}, decode "
        f"{plan.decode.get('method')} (beam {plan.decode.get('beam')}, CTC weight "
        f"{plan.decode.get('ctc_weight')}"
        + (
            f", LM {plan.decode['lm']} weight {plan.decode['lm_weight']}"
            if "lm" in plan.decode
            else ""
        )
        + "). Test = held-out voices. Differences are arm minus "
        f"`{plan.baseline}` (negative = better).",
        "",
        "| arm | seeds | dev WER | dev CER | test WER | test CER | paired test WER diff per seed "
        "| mean test WER diff [95% CI] | mean test CER diff [95% CI] "
        "| seeds' 95% t-interval, WER / CER |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for a in plan.arms:
        st = stats.get(a.name)
        if not st:
            lines.append(f"| {a.name} | 0 | | | | | | | | |")
            continue
        label = a.name + (f" (decode {a.decode['method']})" if "method" in a.decode else "")

        def ms(key, st=st):
            m, sd = st[key]
            return f"{pct * m:.2f} ± {pct * sd:.2f}"

        paired = st.get("paired_test_wer")
        per = ", ".join(f"{pct * v:+.2f}" for v in paired.values()) if paired else "(baseline)"

        def ci(key, st=st):
            if f"bootstrap_{key}" not in st:
                return ""
            o, lo, hi = st[f"bootstrap_{key}"]
            return f"{pct * o:+.2f} [{pct * lo:+.2f}, {pct * hi:+.2f}]"

        def tci(key, st=st):
            t = st.get(f"seed_t_{key}")
            return f"[{pct * t[1]:+.2f}, {pct * t[2]:+.2f}]" if t else ""

        seed_ci = f"{tci('test_wer')} / {tci('test_cer')}" if st.get("seed_t_test_wer") else ""
        lines.append(
            f"| {label} | {len(st['seeds'])} | {ms('dev_wer')} | {ms('dev_cer')} | "
            f"{ms('test_wer')} | {ms('test_cer')} | {per} | {ci('test_wer')} | "
            f"{ci('test_cer')} | {seed_ci} |"
        )
    lines += [
        "",
        "[95% CI]: paired bootstrap over test utterances, seeds pooled (test-set sampling only). "
        "Seeds' t-interval: the per-seed paired differences as the samples (run-to-run "
        "variation; with 3 seeds t = 4.30, so it is wide). A difference is a finding when both "
        "exclude 0.",
    ]
    return "\n".join(lines) + "\n"


def plot_curves(plan: Plan, out: Path, png: Path) -> None:
    """Dev CER (CTC greedy, from each run's dev.csv) against step: one line per arm (mean over
    seeds), the band between the seeds' min and max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdcache.student.rundir import column, read_metrics

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = plt.get_cmap("tab20").colors  # 10 hues x 2 shades; past 10 arms a dashed line too
    for i, a in enumerate(plan.arms):
        curves = []
        for s in plan.seeds:
            rd = run_dir(out, a.name, s)
            if (rd / DONE).exists() and (rd / "dev.csv").exists():  # finished runs only
                rows = read_metrics(rd, "dev.csv")
                curves.append((column(rows, "step"), column(rows, "dev_cer")))
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)
        steps = np.asarray(curves[0][0][:n])
        y = 100 * np.asarray([c[1][:n] for c in curves])
        (line,) = ax.plot(
            steps,
            y.mean(0),
            label=f"{a.name} ({len(curves)} seeds)",
            color=colors[(2 * i) % 20 + (i // 10) % 2],
            linestyle="--" if (i // 10) % 2 else "-",
        )
        ax.fill_between(steps, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev CER, % (CTC greedy)")
    ax.set_title(f"study {plan.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot_runs(runs: dict[str, Path], png: Path, *, metric: str = "dev_cer") -> None:
    """Learning curves of any runs with a dev.csv: ``metric`` against step (left) and against
    training seconds (right), one line per run (label -> run dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdcache.student.rundir import column, read_metrics

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110, sharey=True)
    for label, rd in runs.items():
        rows = read_metrics(rd, "dev.csv")
        y = [100 * v for v in column(rows, metric)]
        a1.plot(column(rows, "step"), y, marker=".", label=label)
        a2.plot([t / 60 for t in column(rows, "train_seconds")], y, marker=".", label=label)
    a1.set_xlabel("optimizer step")
    a2.set_xlabel("training minutes (as measured, on a shared machine)")
    a1.set_ylabel(f"{metric.replace('_', ' ')}, % (CTC greedy)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
