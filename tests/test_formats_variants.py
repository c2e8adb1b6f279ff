"""Peers' files of the dictionary variants, written by hand in each peer's layout and compared with its formula:
SAELens's batchtopk / matryoshka_batchtopk training checkpoints, and dictionary_learning's runs (ae.pt refused,
its state dict converted). benchmarks/check_formats_with_peers.py checks the same against the real sae-lens and
dictionary-learning."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_formats import F64, D, Evil, N, dense, rand, rows, write_saelens

import saehook
from saehook.formats import FormatError, detect_format, load
from saehook.formats.dictionary_learning import from_state_dict

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


# ---------------------------------------------------------------------------------------------- dictionary_learning
def dl_state(dict_class):
    """dictionary_learning 0.1.0's state_dict() layout of ``dict_class`` (random weights, thresholds that bind)."""
    W_enc, W_dec = rand(N, D, seed=1), rand(N, D, seed=2)  # saehook's orientation
    b_enc, b_dec = rand(N, seed=3, scale=0.5), rand(D, seed=4, scale=0.5)
    if dict_class == "BatchTopKSAE":
        return {"k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(1.5), "decoder.weight": W_dec.T,
                "encoder.weight": W_enc, "encoder.bias": b_enc, "b_dec": b_dec}
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {"k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(1.5),
                "group_sizes": torch.tensor([8, 24, 32]), "W_enc": W_enc.T, "b_enc": b_enc, "W_dec": W_dec,
                "b_dec": b_dec}
    return {"W_enc": W_enc.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
            "threshold": torch.linspace(-0.5, 3.0, N)}


def dl_reference(sd, dict_class, x):
    """dictionary_learning's encode / decode (use_threshold=True, its inference default)."""
    sd = {n: v.to(x.dtype) if v.is_floating_point() else v for n, v in sd.items()}
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input = False
        pre = x @ sd["W_enc"] + sd["b_enc"]
        z = (pre * (pre > sd["threshold"])).relu()
        return z, z @ sd["W_dec"] + sd["b_dec"]
    if dict_class == "BatchTopKSAE":
        a = ((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"]).relu()
        z = a * (a > sd["threshold"])
        return z, z @ sd["decoder.weight"].T + sd["b_dec"]
    a = ((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]).relu()
    z = a * (a > sd["threshold"])
    return z, z @ sd["W_dec"] + sd["b_dec"]


DL_CLASSES = {"BatchTopKSAE": saehook.BatchTopKSAE, "MatryoshkaBatchTopKSAE": saehook.MatryoshkaBatchTopKSAE,
              "JumpReluAutoEncoder": saehook.JumpReLUSAE}


@pytest.mark.parametrize("dict_class", list(DL_CLASSES))
def test_dictionary_learning_state_dict_converts_with_its_formula(dict_class):
    sd = dl_state(dict_class)
    sae = from_state_dict(sd, dict_class, dtype=F64).eval()
    assert type(sae) is DL_CLASSES[dict_class] and sae.metadata["source_format"] == "dictionary_learning"
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert sae.prefixes == [8, 32, 64]  # running sums of group_sizes
    x = rows()
    z_ref, out_ref = dl_reference(sd, dict_class, x)
    l0 = (z_ref > 0).sum(-1)
    assert 0 < int(l0.min()) < int(l0.max()) < N  # the thresholds gate differently per row
    codes = sae.encode(x)
    torch.testing.assert_close(dense(codes, N), z_ref)
    torch.testing.assert_close(sae.decode(codes), out_ref)
    with pytest.raises(FormatError, match=r"not a dictionary_learning BatchTopKSAE: \['b_dec', 'decoder.weight'"):
        from_state_dict({"k": torch.tensor(4)}, "BatchTopKSAE")
    with pytest.raises(FormatError, match="'AutoEncoder' has no saehook conversion; saehook converts BatchTopKSAE"):
        from_state_dict(sd, "AutoEncoder")


def test_dictionary_learning_ae_pt_is_refused_without_unpickling(tmp_path):
    run = tmp_path / "sweep" / "trainer_0"  # dictionary_learning's layout: one folder per trainer
    run.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({**dl_state("BatchTopKSAE"), "evil": Evil(str(marker))}, run / "ae.pt")
    (run / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": 4}, "buffer": {}}))
    assert detect_format(run) == detect_format(run / "ae.pt") == "dictionary_learning"
    for path in (run, run / "ae.pt", tmp_path / "sweep"):
        with pytest.raises(FormatError, match=r"dictionary_learning BatchTopKSAE saved as a pickle .* does not "
                                              r"unpickle; .*from_state_dict\(torch.load\("):
            load(path)
    assert not marker.exists()  # nothing was unpickled
