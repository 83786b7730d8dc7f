"""Student model: config, shapes per switch, padding exactness, export, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kdcache.student.conformer import ConvSubsampling, subsampled_lengths
from kdcache.student.model import (
    Student,
    StudentConfig,
    count_parameters,
    decoder_inputs,
    decoder_targets,
)

torch.set_num_threads(1)

V = 12  # blank 0, bos 1, eos 2, tokens 3..11


def tiny(**kw) -> StudentConfig:
    base = dict(
        vocab_size=V,
        input_dim=20,
        d_model=32,
        num_heads=4,
        ff_mult=2,
        num_layers=3,
        conv_kernel=5,
        dropout=0.0,
        decoder_layers=1,
        decoder_heads=4,
        cif_decoder_layers=1,
    )
    base.update(kw)
    return StudentConfig(**base)


def batch(lens=(61, 40), tlens=(5, 3), feat_dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lens), max(lens), feat_dim, generator=g)
    targets = torch.randint(3, V, (len(tlens), max(tlens)), generator=g)
    for i, n in enumerate(tlens):
        targets[i, n:] = -100
    return feats, torch.tensor(lens), targets, torch.tensor(tlens)


# ---------------------------------------------------------------------------------------------
# config


def test_config_defaults_and_unknown_keys():
    StudentConfig()  # every field has a default (vocab_size set later)
    with pytest.raises(ValueError, match="vocab_size"):
        Student(StudentConfig())
    with pytest.raises(ValueError, match="unknown keys.*d_modle"):
        StudentConfig.from_dict({"vocab_size": 10, "d_modle": 3})
    with pytest.raises(TypeError):
        StudentConfig(vocab_size=10, d_modle=3)
    cfg = StudentConfig.from_dict(tiny(aux_kd_heads={"bert": 7}).to_dict())
    assert cfg == tiny(aux_kd_heads={"bert": 7})


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(conv_kernel=4), "odd"),
        (dict(subsampling=3), "subsampling"),
        (dict(interaed_layers=[4]), "interaed_layers"),
        (dict(decoder_layers=0, aux_kd_heads={"a": 3}), "aux_kd_source"),
        (dict(aux_kd_heads={"a": 3}, aux_kd_source="cif"), "use_cif"),
        (dict(acd_proj={"bert": 8}), "use_cif"),
        (dict(lrd_proj={"a.b": 8}), "'.'"),
        (dict(eos_id=V), "eos_id"),
        (dict(blank_id=1), "blank_id"),
        (dict(aux_kd_source="frames"), "aux_kd_source"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_interaed_negative_layers_resolve():
    assert tiny(interaed_layers=[-1, 2, 3]).interaed_layer_ids == (2, 3)


# ---------------------------------------------------------------------------------------------
# subsampling


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_subsampling_length_formula(factor):
    sub = ConvSubsampling(20, 8, factor)
    for t in range(2 * factor, 70, 3):
        x, lens = sub(torch.zeros(1, t, 20), torch.tensor([t]))
        assert x.shape[1] == int(lens) == int(subsampled_lengths(torch.tensor([t]), factor))
    t = torch.tensor([7, 8, 9, 10, 11, 100])
    assert subsampled_lengths(t, 4).tolist() == [((n - 1) // 2 - 1) // 2 for n in t.tolist()]


def test_too_short_input_raises():
    m = Student(tiny()).eval()
    with pytest.raises(ValueError, match="too short"):
        m(torch.zeros(1, 6, 20), torch.tensor([6]))


# ---------------------------------------------------------------------------------------------
# shapes per switch

SWITCHES = {
    "ctc": dict(decoder_layers=0),
    "aed": dict(),
    "aed_aux": dict(aux_kd_heads={"bert": 17, "phones": 9}, lrd_proj={"bert": 24}),
    "interaed": dict(decoder_layers=0, interaed_layers=[1, 3]),
    "interaed_shared": dict(decoder_layers=0, interaed_layers=[2, -1], interaed_shared=True),
    "cif": dict(
        decoder_layers=0,
        use_cif=True,
        acd_proj={"bert": 24},
        lrd_proj={"bert": 24},
        lrd_source="cif",
        aux_kd_heads={"bert": 17},
        aux_kd_source="cif",
    ),
    "cif_nar": dict(decoder_layers=0, use_cif=True, cif_autoregressive=False),
    "enc_aux": dict(decoder_layers=0, aux_kd_heads={"ens": 5}, aux_kd_source="encoder"),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_shapes(name):
    cfg = tiny(**SWITCHES[name])
    m = Student(cfg).eval()
    feats, lens, targets, tlens = batch()
    b, length, t_enc = 2, 5, int(subsampled_lengths(lens, 4).max())
    o = m(feats, lens, targets, tlens)
    assert o.ctc_logits.shape == (b, t_enc, V)
    assert o.enc_out.shape == (b, t_enc, 32)
    assert o.enc_lens.tolist() == subsampled_lengths(lens, 4).tolist()
    assert o.enc_mask.sum(1).tolist() == o.enc_lens.tolist()
    if cfg.decoder_layers:
        assert o.dec_logits.shape == (b, length + 1, V)
        assert o.dec_states.shape == (b, length + 1, 32)
        assert o.dec_mask.sum(1).tolist() == [6, 4]
    else:
        assert o.dec_logits is None and o.dec_states is None
    assert sorted(o.interaed_logits) == list(cfg.interaed_layer_ids)
    for logits in o.interaed_logits.values():
        assert logits.shape == (b, length + 1, V)
    if cfg.use_cif:
        assert o.cif_out.shape == (b, length, 32)
        assert o.cif_lens.tolist() == [5, 3]
        assert o.cif_logits.shape == (b, length, V)
        assert o.cif_states.shape == (b, length, 32)
        assert o.alpha_sum.shape == (b,) and o.alphas.shape == (b, t_enc)
    else:
        assert o.cif_out is None and o.cif_logits is None
    positions = {"decoder": length + 1, "cif": length, "encoder": t_enc}
    for head, n in cfg.aux_kd_heads.items():
        assert o.aux_kd_logits[head].shape == (b, positions[cfg.aux_kd_source], n)
    for head, n in cfg.acd_proj.items():
        assert o.acd_proj[head].shape == (b, length, n)
    for head, n in cfg.lrd_proj.items():
        assert o.lrd_proj[head].shape == (b, positions[cfg.lrd_source], n)
    # inference path: no decoders, CIF unscaled
    o = m(feats, lens)
    assert o.dec_logits is None and not o.interaed_logits and o.cif_logits is None
    if cfg.use_cif:
        assert o.cif_out.shape[:2] == o.cif_mask.shape and o.cif_lens.shape == (b,)
    if cfg.aux_kd_source == "encoder":
        assert o.aux_kd_logits["ens"].shape == (b, t_enc, 5)


def test_targets_padded_wider_than_longest_keep_all_heads_aligned():
    m = Student(tiny(**SWITCHES["cif"])).eval()
    feats, lens, targets, tlens = batch()
    wide = torch.cat([targets, torch.full((2, 3), -100)], 1)  # [2, 8], longest target is 5
    o = m(feats, lens, wide, tlens)
    assert o.cif_out.shape[1] == o.cif_logits.shape[1] == o.acd_proj["bert"].shape[1] == 8
    assert o.cif_mask.sum(1).tolist() == [5, 3]


def test_decoder_io_alignment():
    targets = torch.tensor([[5, 6, 7], [8, 9, -100]])
    tlens = torch.tensor([3, 2])
    assert decoder_inputs(targets, tlens, bos_id=1, eos_id=2).tolist() == [
        [1, 5, 6, 7],
        [1, 8, 9, 2],
    ]
    assert decoder_targets(targets, tlens, eos_id=2).tolist() == [[5, 6, 7, 2], [8, 9, 2, -100]]


# ---------------------------------------------------------------------------------------------
# padding exactness

FULL = dict(
    interaed_layers=[1, 3],
    use_cif=True,
    aux_kd_heads={"bert": 17},
    acd_proj={"bert": 24},
    lrd_proj={"bert": 24},
)


@pytest.mark.parametrize("cif_ar", [True, False])
def test_padding_and_batching_do_not_change_valid_outputs(cif_ar):
    m = Student(tiny(**FULL, cif_autoregressive=cif_ar)).eval()
    feats, lens, targets, tlens = batch(lens=(61, 40), tlens=(5, 3))
    garbage = feats.clone()
    garbage[1, 40:] = 1e3 * torch.randn(21, 20)
    garbage_t = targets.clone()
    garbage_t[1, 3:] = 7
    with torch.no_grad():
        full = m(feats, lens, targets, tlens)
        dirty = m(garbage, lens, garbage_t, tlens)
        alone = m(feats[1:, :40], lens[1:], targets[1:, :3], tlens[1:])
        inf_full, inf_alone = m(feats, lens), m(feats[1:, :40], lens[1:])

    def same(a, b, n_valid, atol=1e-4):
        torch.testing.assert_close(
            a[1, :n_valid], b[0 if b.shape[0] == 1 else 1, :n_valid], atol=atol, rtol=1e-4
        )

    t1, l1 = int(full.enc_lens[1]), 3
    for other in (dirty, alone):
        same(full.enc_out, other.enc_out, t1)
        same(full.ctc_logits, other.ctc_logits, t1)
        same(full.dec_logits, other.dec_logits, l1 + 1)
        same(full.dec_states, other.dec_states, l1 + 1)
        for layer in (1, 3):
            same(full.interaed_logits[layer], other.interaed_logits[layer], l1 + 1)
        same(full.alphas, other.alphas, t1)
        torch.testing.assert_close(full.alpha_sum[1], other.alpha_sum[-1])
        same(full.cif_out, other.cif_out, l1)
        same(full.cif_logits, other.cif_logits, l1)
        same(full.aux_kd_logits["bert"], other.aux_kd_logits["bert"], l1 + 1)
        same(full.acd_proj["bert"], other.acd_proj["bert"], l1)
    assert int(inf_full.cif_lens[1]) == int(inf_alone.cif_lens[0])
    same(inf_full.cif_out, inf_alone.cif_out, int(inf_alone.cif_lens[0]))
    # padded positions of the CIF output are exactly zero
    assert torch.all(full.cif_out[1, l1:] == 0)


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("name", ["aed_aux", "interaed", "interaed_shared", "cif", "enc_aux"])
def test_export_ctc_matches_plain_ctc_model(name):
    cfg = tiny(**SWITCHES[name])
    m = Student(cfg)
    ctc_cfg, state = m.export_ctc()
    plain = Student(tiny(decoder_layers=0))
    assert ctc_cfg == plain.cfg
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()
    }
    assert count_parameters(Student(ctc_cfg)) == count_parameters(plain) < count_parameters(m)
    exported = Student(ctc_cfg).eval()
    exported.load_state_dict(state, strict=True)
    feats, lens, _, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(feats, lens).ctc_logits, m.eval()(feats, lens).ctc_logits
        )


# ---------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize(
    "variant",
    [
        dict(**FULL),
        dict(
            decoder_layers=0,
            interaed_layers=[2, 3],
            interaed_shared=True,
            use_cif=True,
            cif_autoregressive=False,
            aux_kd_heads={"a": 5, "b": 7},
            aux_kd_source="cif",
            lrd_proj={"bert": 24},
            lrd_source="cif",
            acd_proj={"bert": 16},
        ),
        dict(decoder_layers=0, aux_kd_heads={"ens": 5}, aux_kd_source="encoder"),
    ],
)
def test_gradient_reaches_every_parameter(variant):
    m = Student(tiny(**variant)).train()
    feats, lens, targets, tlens = batch()
    o = m(feats, lens, targets, tlens)
    tensors = [
        o.ctc_logits,
        o.dec_logits,
        o.cif_logits,
        o.alpha_sum,
        *o.interaed_logits.values(),
        *o.aux_kd_logits.values(),
        *o.acd_proj.values(),
        *o.lrd_proj.values(),
    ]
    loss = sum((t.float() ** 2).mean() for t in tensors if t is not None)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_default_config_builds():
    m = Student(StudentConfig(vocab_size=256))
    assert 4e6 < count_parameters(m) < 8e6
    fields = {f.name for f in dataclasses.fields(StudentConfig)}
    assert {"interaed_layers", "use_cif", "aux_kd_heads", "blank_id"} <= fields
