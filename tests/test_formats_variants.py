"""Peers' files of the dictionary variants, written by hand in each peer's layout and compared with its formula:
SAELens's batchtopk / matryoshka_batchtopk training checkpoints (benchmarks/check_formats_with_peers.py checks the
same against the real sae-lens)."""

import pytest
import torch
from safetensors.torch import save_file
from test_formats import F64, N, dense, rows, write_saelens

import saehook
from saehook.formats import FormatError, load

THETA = 0.9


def batchtopk_reference(t, x):
    """SAELens's inference conversion of a BatchTopK checkpoint (a jumprelu at topk_threshold), with its
    rescale_acts_by_decoder_norm: pre = ((x - b_dec) W_enc + b_enc) ||W_dec||, z = ReLU(pre) (pre > theta),
    x_hat = (z / ||W_dec||) W_dec + b_dec."""
    t = {n: v.to(x.dtype) for n, v in t.items()}
    norms = t["W_dec"].norm(dim=-1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    z = pre.relu() * (pre > THETA)
    return z, (z / norms) @ t["W_dec"] + t["b_dec"]


def write_checkpoint(folder, arch, **cfg):
    """SAELens's TrainingSAE.save_model layout for batchtopk (sae-lens 6.54's fields and defaults)."""
    base = {"architecture": arch, "k": 4, "apply_b_dec_to_input": True, "normalize_activations": "none",
            "rescale_acts_by_decoder_norm": True, "topk_threshold_lr": 0.01}
    extra = {"topk_threshold": torch.tensor(THETA, dtype=F64)}
    t = write_saelens(folder, {**base, **cfg}, extra=extra)
    t["W_enc"] = t["W_enc"] * 2.0  # a larger code, so the threshold binds on some rows and not others
    save_file({**t, **extra}, str(folder / "sae_weights.safetensors"))
    return t


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_batchtopk_checkpoint_matches_its_jumprelu_formula(tmp_path, arch):
    t = write_checkpoint(tmp_path / arch, arch, matryoshka_widths=[8, 32])
    sae = load(tmp_path / arch, dtype=F64)
    assert type(sae) is (saehook.BatchTopKSAE if arch == "batchtopk" else saehook.MatryoshkaBatchTopKSAE)
    assert (sae.k, sae.k_max) == (4, N) and float(sae.threshold) == pytest.approx(THETA)
    if arch == "matryoshka_batchtopk":
        assert sae.prefixes == [8, 32, N]  # d_sae appended, as SAELens's config does
    x = rows()
    z_ref, out_ref = batchtopk_reference(t, x)
    l0 = (z_ref > 0).sum(-1).float()
    assert 0 < l0.min() < l0.max() < N  # the threshold gates: the rows keep different numbers of latents
    sae.eval()
    codes = sae.encode(x)
    torch.testing.assert_close(dense(codes, N), z_ref)
    torch.testing.assert_close(sae.decode(codes), out_ref)
    torch.testing.assert_close(sae(x).x_hat, out_ref)


def test_saelens_batchtopk_refusals(tmp_path):
    write_checkpoint(tmp_path / "frac", "batchtopk", k=2.5)
    with pytest.raises(FormatError, match=r"k of 2\.5 .* whole number .* round it in cfg\.json"):
        load(tmp_path / "frac")
    folder = tmp_path / "nothreshold"
    write_saelens(folder, {"architecture": "batchtopk", "k": 4})
    with pytest.raises(FormatError, match="topk_threshold"):
        load(folder)
    write_checkpoint(tmp_path / "widths", "matryoshka_batchtopk", matryoshka_widths=[32, 8])
    with pytest.raises(FormatError, match="prefixes must be strictly increasing"):
        load(tmp_path / "widths")
