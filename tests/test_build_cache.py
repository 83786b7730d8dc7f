"""build_cache end to end on tiny models: cache contents, bad input, two ranks, kill and resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tiny_models import SENTENCES, write_manifest

from kdcache.cache_format import content_hash, open_cache
from kdcache.teachers.build import BuildError, build_cache


def targets(path, teacher):
    c = open_cache(str(path))
    return {u: c.get(u, teacher) for u in c.utt_ids(teacher)}


def assert_same(a, b, atol=0.0):
    assert sorted(a) == sorted(b)
    for u in a:
        x, y = a[u], b[u]
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        # Stored log-probs keep few mantissa bits: a value next to a rounding boundary may land
        # one step (2**-7 relative) away in two builds whose float sums differ in the last bit.
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=2**-6, atol=atol)
        np.testing.assert_allclose(x.tail_logmass, y.tail_logmass, atol=atol)
        for layer in x.hidden:
            np.testing.assert_allclose(x.hidden[layer], y.hidden[layer], atol=atol)
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        assert x.text == y.text and x.input_hash == y.input_hash


def finish(p, timeout: float = 120) -> int | None:
    """Wait for a spawned build; a hung one is killed (and fails the test) instead of lingering."""
    p.join(timeout=timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return None
    return p.exitcode


def test_build_writes_record_and_targets(tmp_path, tiny_bert):
    m = write_manifest(tmp_path / "m.jsonl", extra=[{"id": "empty", "text": "  ?! "}])
    s = build_cache(
        teacher="bert",
        model=str(tiny_bert),
        data=str(m),
        out=str(tmp_path / "c.kdc"),
        k=4,
        hidden_layers=(-1,),
        hidden_codec="int8",
        progress=False,
    )
    assert s.utterances_done == len(SENTENCES) + 1 and s.utterances_empty == 1
    c = open_cache(str(tmp_path / "c.kdc"))
    rec = c.teachers["bert"]
    assert rec.kind == "masked_lm" and rec.k == 4 and rec.hidden_layers == (2,)
    assert rec.hidden_dims == {"2": 32} and rec.hidden_codec == "int8"
    assert rec.options["mlm_mode"] == "masked" and len(rec.model_hash) == 64
    from kdcache.data.tokenizer import Tokenizer

    assert rec.tokenizer_hash == Tokenizer.load(str(tiny_bert)).content_hash()
    u = c.get("u000", "bert")
    assert u.text == SENTENCES[0] and u.input_hash == content_hash(SENTENCES[0])
    assert list(u.token_ids) == Tokenizer.load(str(tiny_bert)).encode(SENTENCES[0])
    assert u.topk_ids.shape == (len(u.token_ids), 4)
    e = c.get("empty", "bert")
    assert e.topk_ids.shape == (0, 4) and e.text == ""


def test_bad_inputs(tmp_path, tiny_bert):
    out = str(tmp_path / "c.kdc")
    m = write_manifest(
        tmp_path / "m.jsonl",
        texts=["hello world", "ok 中文 naïve"],
        extra=[{"id": "notext", "audio": None}],
    )
    with pytest.raises(BuildError, match="'notext'.*--skip-bad"):
        build_cache(teacher="bert", model=str(tiny_bert), data=str(m), out=out, k=4, progress=False)
    assert not os.path.exists(out) or not open_cache(out).utt_ids()  # nothing half-written
    s = build_cache(
        teacher="bert",
        model=str(tiny_bert),
        data=str(m),
        out=out,
        k=4,
        skip_bad=True,
        progress=False,
    )
    assert s.utterances_skipped_bad == 1 and s.bad_utterances == ["notext"]
    assert s.unk_tokens >= 1  # 中/文 are not in the toy vocabulary: [UNK] positions, kept
    with pytest.raises(BuildError, match="--top-k"):
        build_cache(
            teacher="bert",
            model=str(tiny_bert),
            data=str(m),
            out=str(tmp_path / "x.kdc"),
            k=100000,
            progress=False,
            skip_bad=True,
        )
    with pytest.raises(BuildError, match="no such file"):
        build_cache(
            teacher="bert",
            model=str(tmp_path / "missing"),
            data=str(m),
            out=str(tmp_path / "y.kdc"),
            k=4,
            progress=False,
        )
    with pytest.raises(BuildError, match="--hidden-layers"):
        build_cache(
            teacher="bert",
            model=str(tiny_bert),
            data=str(m),
            out=str(tmp_path / "z.kdc"),
            k=0,
            progress=False,
        )
    with pytest.raises(BuildError, match="--teacher"):
        build_cache(
            teacher="gpt",
            model=str(tiny_bert),
            data=str(m),
            out=str(tmp_path / "z.kdc"),
            k=4,
            progress=False,
        )


def _child(args: dict, kill_after: int | None) -> None:
    import torch

    torch.set_num_threads(1)
    if kill_after is not None:  # die hard (SIGKILL) while adding this utterance
        import signal

        from kdcache.cache_format import writer as w

        orig, n = w.CacheWriter.add, [0]

        def add(self, u):
            n[0] += 1
            if n[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            orig(self, u)

        w.CacheWriter.add = add
    build_cache(**args)


def spawn(args: dict, kill_after: int | None = None):
    """A separate OS process running build_cache. Forked, so it starts in milliseconds instead
    of re-importing torch and transformers."""
    import multiprocessing as mp

    p = mp.get_context("fork").Process(target=_child, args=(args, kill_after))
    p.start()
    return p


def test_two_ranks_equal_one_process(tmp_path, tiny_llama):
    m = write_manifest(tmp_path / "m.jsonl")
    common = dict(
        teacher="causal_lm",
        model=str(tiny_llama),
        data=str(m),
        k=5,
        hidden_layers=(-1,),
        progress=False,
        device="cpu",
    )
    build_cache(out=str(tmp_path / "one.kdc"), **common)
    procs = [
        spawn(dict(common, out=str(tmp_path / "two.kdc"), rank=r, world_size=2)) for r in range(2)
    ]
    for p in procs:
        finish(p)
    assert [p.exitcode for p in procs] == [0, 0]
    commits = sorted(os.listdir(tmp_path / "two.kdc" / "commits" / "causal_lm"))
    assert [c[:6] for c in commits] == ["r00000", "r00001"]
    assert_same(
        targets(tmp_path / "one.kdc", "causal_lm"),
        targets(tmp_path / "two.kdc", "causal_lm"),
        atol=1e-3,
    )


def test_killed_build_resumes(tmp_path, tiny_bert):
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES * 3)
    common = dict(
        teacher="bert",
        model=str(tiny_bert),
        data=str(m),
        k=4,
        hidden_layers=(-1,),
        progress=False,
        device="cpu",
        shard_positions=20,
    )
    build_cache(out=str(tmp_path / "ref.kdc"), **common)
    # A build that dies hard (SIGKILL) in the middle of its 12th utterance's shard.
    p = spawn(dict(common, out=str(tmp_path / "c.kdc")), kill_after=12)
    rc = finish(p)
    assert rc == -9
    partial = open_cache(str(tmp_path / "c.kdc")).utt_ids("bert")
    assert 0 < len(partial) < 11  # committed shards only
    s = build_cache(out=str(tmp_path / "c.kdc"), **common)
    assert s.utterances_resumed == len(partial)
    assert s.utterances_done == len(SENTENCES) * 3 - len(partial)
    assert_same(
        targets(tmp_path / "ref.kdc", "bert"), targets(tmp_path / "c.kdc", "bert"), atol=1e-3
    )
    from kdcache.cache_format import verify_cache

    assert verify_cache(str(tmp_path / "c.kdc")) == []
    # A finished build run again does nothing.
    s = build_cache(out=str(tmp_path / "c.kdc"), **common)
    assert s.utterances_done == 0


def test_resume_refuses_changed_transcripts(tmp_path, tiny_bert):
    common = dict(
        teacher="bert", model=str(tiny_bert), out=str(tmp_path / "c.kdc"), k=2, progress=False
    )
    build_cache(data=str(write_manifest(tmp_path / "a.jsonl", texts=SENTENCES[:3])), **common)
    changed = write_manifest(tmp_path / "b.jsonl", texts=[SENTENCES[0], "something else", "more"])
    with pytest.raises(BuildError, match="another transcript.*'u00[12]'"):
        build_cache(data=str(changed), **common)


def test_record_json_is_plain(tmp_path, tiny_llama):
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:2])
    build_cache(
        teacher="causal_lm",
        model=str(tiny_llama),
        data=str(m),
        out=str(tmp_path / "c.kdc"),
        name="gpt-tiny",
        k=2,
        progress=False,
    )
    attrs = json.loads((tmp_path / "c.kdc" / "teachers" / "gpt-tiny" / "zarr.json").read_text())
    rec = attrs["attributes"]["kdcache_teacher"]
    assert rec["kind"] == "causal_lm" and rec["options"]["position0"] == "predicted"
