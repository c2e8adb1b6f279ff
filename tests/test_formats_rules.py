"""Foreign files are read by their authors' rules: for each key a peer's loader treats as missing or optional, a
tiny file without it, loaded by saehook and compared with the value the peer's own formulas give (written out here
from the peer's code: openai/sparse_autoencoder ``Autoencoder.from_state_dict``, EleutherAI sparsify
``SparseCoder.load_from_disk`` / ``SparseCoderConfig``, SAELens 6 ``SAE.load_from_disk`` /
``handle_pre_6_0_config`` / ``TopKSAEConfig``), or refused where the peer's loader refuses it too."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from saehook import TopKSAE
from saehook.formats import FormatError, LayerNormTopKSAE, load, load_openai

F64 = torch.float64


def rand(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def topk_relu(pre, k):
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


# ---------------------------------------------------------------------------------------------- OpenAI
def test_openai_without_activation_uses_no_layer_norm(tmp_path):
    """``Autoencoder.from_state_dict``: ``activation = state_dict.pop("activation", "ReLU")``, ``normalize =
    activation == "TopK"``. A file without the entry is read without layer norm; with k given, saehook's TopK of
    it must be ``decoder(TopK(encoder(x - pre_bias) + latent_bias)) + pre_bias`` on the raw rows. Before, saehook
    switched OpenAI's layer norm on here: max |error| 472 on this case."""
    d, n, k = 8, 32, 4
    sd = {"encoder.weight": rand(n, d, seed=0), "latent_bias": rand(n, seed=1, scale=0.1),
          "pre_bias": rand(d, seed=2, scale=0.5), "decoder.weight": rand(d, n, seed=3)}
    torch.save(sd, tmp_path / "0.pt")
    x = 30.0 * rand(20, d, seed=4) + 5.0  # raw residual-stream scale: far from unit variance
    pre = F.linear(x - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    want = F.linear(topk_relu(pre, k), sd["decoder.weight"]) + sd["pre_bias"]
    sae = load_openai(tmp_path / "0.pt", k=k)
    torch.testing.assert_close(sae(x).x_hat, want)
    torch.testing.assert_close(sae.decode(sae.encode(x)), want)
    assert type(sae) is TopKSAE
    with pytest.raises(FormatError, match="no 'activation' entry.*ReLU autoencoder without layer norm"):
        load(tmp_path / "0.pt")  # without k: OpenAI's loader builds a ReLU autoencoder, which saehook cannot
    # the rule saehook followed before (layer norm on) is far off on this case
    xc = x - x.mean(-1, keepdim=True)
    std = xc.std(-1, keepdim=True)
    pre_ln = F.linear(xc / (std + 1e-5) - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    old = (F.linear(topk_relu(pre_ln, k), sd["decoder.weight"]) + sd["pre_bias"]) * std + x.mean(-1, keepdim=True)
    assert (old - want).abs().max() > 100
    torch.testing.assert_close(load_openai(tmp_path / "0.pt", k=k, layernorm=True)(x).x_hat, old)


def test_openai_topk_entry_switches_layer_norm_on(tmp_path):
    d, n, k = 8, 32, 4
    sd = {"encoder.weight": rand(n, d, seed=0), "latent_bias": rand(n, seed=1, scale=0.1),
          "pre_bias": rand(d, seed=2, scale=0.5), "decoder.weight": rand(d, n, seed=3),
          "activation": "TopK", "activation_state_dict": {"k": k, "postact_fn": "ReLU"}}
    torch.save(sd, tmp_path / "0.pt")
    assert isinstance(load(tmp_path / "0.pt"), LayerNormTopKSAE)


# ---------------------------------------------------------------------------------------------- sparsify
def write_sparsify(folder, cfg, d=16, n=64, seed=0):
    folder.mkdir(parents=True)
    t = {"encoder.weight": rand(n, d, seed=seed), "encoder.bias": rand(n, seed=seed + 1, scale=0.1),
         "W_dec": rand(n, d, seed=seed + 2), "b_dec": rand(d, seed=seed + 3, scale=0.5)}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def sparsify_x_hat(t, x, k):
    """SparseCoder.forward: TopK(ReLU(encoder(x - b_dec))), decoded as top_acts @ W_dec[top_indices] + b_dec."""
    pre = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    vals, idx = pre.topk(k, dim=-1)
    return (vals.unsqueeze(-1) * t["W_dec"][idx]).sum(-2) + t["b_dec"]


def test_sparsify_missing_k_is_32(tmp_path):
    """SparseCoderConfig.k defaults to 32; load_from_disk builds the coder from the config with its defaults.
    Before, saehook refused a cfg.json without k."""
    t = write_sparsify(tmp_path / "l", {"d_in": 16, "num_latents": 64})
    sae = load(tmp_path / "l")
    assert sae.k == 32
    x = rand(10, 16, seed=9)
    torch.testing.assert_close(sae(x).x_hat, sparsify_x_hat(t, x, 32))


def test_sparsify_latent_count_from_expansion_factor(tmp_path):
    """num_latents = cfg.num_latents or d_in * expansion_factor (default 32); a mismatch with the tensors fails
    sparsify's strict load, and saehook refuses it too (before, num_latents = 0 was accepted with any width)."""
    write_sparsify(tmp_path / "ok", {"d_in": 16, "num_latents": 0, "expansion_factor": 4, "k": 4})
    assert load(tmp_path / "ok").n_latents == 64
    write_sparsify(tmp_path / "bad", {"d_in": 16, "num_latents": 0, "k": 4})  # 16 * 32 = 512 != 64
    with pytest.raises(FormatError, match="512 latents as sparsify counts them.*does not match"):
        load(tmp_path / "bad")
    write_sparsify(tmp_path / "nod", {"num_latents": 64, "k": 4})
    with pytest.raises(FormatError, match="no 'd_in', which sparsify's SparseCoder.load_from_disk requires"):
        load(tmp_path / "nod")


# ---------------------------------------------------------------------------------------------- SAELens
def write_saelens(folder, cfg, d=16, n=128, seed=0, scaler=None):
    folder.mkdir(parents=True)
    t = {"W_enc": rand(d, n, seed=seed), "b_enc": rand(n, seed=seed + 1, scale=0.1),
         "W_dec": rand(n, d, seed=seed + 2), "b_dec": rand(d, seed=seed + 3, scale=0.5)}
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": n, "dtype": "float64", **cfg}))
    if scaler is not None:
        (folder / "activation_scaler.json").write_text(json.dumps(scaler))
    return t


def saelens_x_hat(t, x, k):
    """TopKSAE.encode / decode with apply_b_dec_to_input and an identity run-time normalisation."""
    z = topk_relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], k)
    return z @ t["W_dec"] + t["b_dec"]


def test_saelens_finished_expected_average_only_in_is_not_rescaled(tmp_path):
    """SAELens 6's trainer folds the norm scaling factor into the weights when training ends, keeps
    ``normalize_activations: "expected_average_only_in"`` in cfg.json and writes ``activation_scaler.json`` with
    ``scaling_factor: null``; SAE.load_from_disk applies no normalisation in that mode. Before, saehook refused
    such a folder ("stores no scaling factor")."""
    cfg = {"architecture": "topk", "k": 4, "normalize_activations": "expected_average_only_in",
           "apply_b_dec_to_input": True, "metadata": {"sae_lens_version": "6.5.1"}}
    t = write_saelens(tmp_path / "sl", cfg, scaler={"scaling_factor": None})
    sae = load(tmp_path / "sl")
    assert float(sae.input_scale) == 1.0
    x = 4.0 * rand(10, 16, seed=9)
    torch.testing.assert_close(sae(x).x_hat, saelens_x_hat(t, x, 4))


def test_saelens_topk_without_k_is_100(tmp_path):
    """TopKSAEConfig.k defaults to 100 (SAELens 6 config, and a pre-6 config naming architecture 'topk')."""
    for name, extra in (("v6", {"metadata": {"sae_lens_version": "6.0.0"}}), ("old", {})):
        t = write_saelens(tmp_path / name, {"architecture": "topk", **extra})
        sae = load(tmp_path / name)
        assert sae.k == 100
        x = rand(6, 16, seed=9)
        torch.testing.assert_close(sae(x).x_hat, saelens_x_hat(t, x, 100))


def test_saelens_refuses_what_saelens_reads_as_another_architecture(tmp_path):
    """handle_pre_6_0_config makes a config 'topk' only with activation_fn 'topk' *and* activation_fn_kwargs.k;
    without the k it stays 'standard' (a ReLU SAE). A 6.x config must name its architecture."""
    write_saelens(tmp_path / "std", {"architecture": "standard", "activation_fn_str": "topk"})
    with pytest.raises(FormatError, match="SAELens 'standard' autoencoder.*'jumprelu', .*'matryoshka_batchtopk' only"):
        load(tmp_path / "std")
    write_saelens(tmp_path / "v6", {"k": 4, "sae_lens_version": "6.1.0"})
    with pytest.raises(FormatError, match="must say its 'architecture'"):
        load(tmp_path / "v6")
    write_saelens(tmp_path / "sf", {"architecture": "topk", "k": 4, "finetuning_scaling_factor": False})
    (tmp_path / "sf" / "sae_weights.safetensors").unlink()
    save_file({"W_enc": rand(16, 128, seed=0), "b_enc": rand(128, seed=1), "W_dec": rand(128, 16, seed=2),
               "b_dec": rand(16, seed=3), "scaling_factor": 2 * torch.ones(128, dtype=F64)},
              str(tmp_path / "sf" / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="scaling_factor other than ones but finetuning_scaling_factor is false"):
        load(tmp_path / "sf")


def test_architecture_in_cfg_picks_the_class(tmp_path):
    """cfg.json says which dictionary variant wrote it (saehook.architectures); older saves without it are TopK."""
    import json

    import saehook
    from saehook import TopKSAE
    from saehook.sae import SAEConfigError

    sae = TopKSAE(8, 16, 2)
    sae.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    del cfg["architecture"]  # a save from before the field
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    assert type(saehook.load(tmp_path / "a")) is TopKSAE
    cfg["architecture"] = "nonesuch"
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match="holds a 'nonesuch' autoencoder, not 'topk'"):
        TopKSAE.load(tmp_path / "a")
    with pytest.raises(ValueError, match="unknown autoencoder architecture 'nonesuch'; saehook reads .*topk"):
        saehook.load(tmp_path / "a")
