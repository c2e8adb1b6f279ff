"""Ecosystem formats: import files written in each format's real layout (by hand, not by the exporters) and
compare with that format's own formula; export and re-import; detection; errors; the Hub model card."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import load_file, save_file

import saehook
from saehook import Codes, TopKSAE
from saehook.formats import (
    FormatError,
    LayerNormTopKSAE,
    LNCodes,
    detect_format,
    load,
    load_openai,
    load_saelens,
    load_sparsify,
    load_sparsify_dir,
    save_saelens,
    save_sparsify,
)
from saehook.hub import model_card, save_with_card

D, N, K = 16, 64, 4
F64 = torch.float64


def make_sae(d=D, n=N, k=K, seed=0, scale=0.7, cls=TopKSAE, **kw):
    torch.manual_seed(seed)
    sae = cls(d, n, k, dtype=F64, **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.input_scale.fill_(scale)
    sae.metadata = {"hookpoint": "model.layers.1", "tokens": 1234, "steps": 5, "fvu": 0.25}
    return sae


def rows(n=40, d=D, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(n, d, generator=g) + 1.0).to(dtype)


def dense(codes, n):
    return torch.zeros(*codes.values.shape[:-1], n, dtype=codes.values.dtype).scatter(-1, codes.indices, codes.values)


def topk_relu(pre, k):
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def assert_same_sae(a: TopKSAE, b: TopKSAE, x):
    torch.testing.assert_close(dense(a.encode(x), a.n_latents), dense(b.encode(x), b.n_latents))
    torch.testing.assert_close(a.decode(a.encode(x)), b.decode(b.encode(x)))
    torch.testing.assert_close(a(x).x_hat, b(x).x_hat)


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g)


# ---------------------------------------------------------------------------------------------- sparsify
def write_sparsify(folder: Path, d=D, n=N, k=K, seed=0, **cfg_extra):
    """sparsify's SparseCoder.save_to_disk layout, written directly."""
    folder.mkdir(parents=True)
    t = {"encoder.weight": rand(n, d, seed=seed), "encoder.bias": rand(n, seed=seed + 1, scale=0.1),
         "W_dec": rand(n, d, seed=seed + 2), "b_dec": rand(d, seed=seed + 3, scale=0.5)}
    save_file(t, str(folder / "sae.safetensors"), metadata={"format": "pt"})
    cfg = {"expansion_factor": n // d, "normalize_decoder": True, "num_latents": n, "k": k, "multi_topk": False,
           "skip_connection": False, "d_in": d, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def sparsify_reference(t, x, k):
    """sparsify: ReLU(encoder(x - b_dec)), then TopK; decode top_acts @ W_dec[top_indices] + b_dec."""
    t = {n: v.to(x.dtype) for n, v in t.items()}
    pre = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    vals, idx = pre.topk(k, dim=-1)
    recon = (vals.unsqueeze(-1) * t["W_dec"][idx]).sum(-2) + t["b_dec"]
    return torch.zeros_like(pre).scatter(-1, idx, vals), recon


def test_sparsify_import_matches_sparsify_formula(tmp_path):
    t = write_sparsify(tmp_path / "layers.3")
    sae = load_sparsify(tmp_path / "layers.3", dtype=F64)
    x = rows()
    z_ref, recon_ref = sparsify_reference(t, x, K)
    codes = sae.encode(x)
    torch.testing.assert_close(dense(codes, N), z_ref)
    torch.testing.assert_close(sae.decode(codes), recon_ref)
    torch.testing.assert_close(sae(x).x_hat, recon_ref)
    assert float(sae.input_scale) == 1.0 and sae.k == K and not sae.multi_topk
    assert sae.metadata["hookpoint"] == "layers.3" and sae.metadata["source_format"] == "sparsify"
    assert load_sparsify(tmp_path / "layers.3").W_enc.dtype == torch.float32  # default: the file's dtype


def test_sparsify_round_trip_identical(tmp_path):
    sae = make_sae(multi_topk=True)
    save_sparsify(sae, tmp_path / "sp")
    tensors = load_file(str(tmp_path / "sp" / "sae.safetensors"))
    assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert tensors["encoder.weight"].shape == (N, D) and tensors["W_dec"].shape == (N, D)
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert cfg["k"] == K and cfg["num_latents"] == N and cfg["d_in"] == D and cfg["multi_topk"] is True
    assert cfg["skip_connection"] is False and cfg["normalize_decoder"] is False  # rows scaled by 1/s
    back = load(tmp_path / "sp")
    assert type(back) is TopKSAE and back.multi_topk and float(back.input_scale) == 1.0
    x = rows()
    assert_same_sae(sae, back, x)
    # the exported file also follows sparsify's own formula (the input scale was folded in)
    z_ref, recon_ref = sparsify_reference(tensors, x, K)
    torch.testing.assert_close(dense(sae.encode(x), N), z_ref)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recon_ref)


def test_sparsify_unit_decoder_flag_when_scale_is_one(tmp_path):
    sae = TopKSAE(D, N, K)
    save_sparsify(sae, tmp_path / "sp")
    assert json.loads((tmp_path / "sp" / "cfg.json").read_text())["normalize_decoder"] is True


def test_sparsify_multi_hookpoint_folder(tmp_path):
    run = tmp_path / "run"
    t0 = write_sparsify(run / "layers.0", seed=0)
    t1 = write_sparsify(run / "layers.1", seed=10)
    (run / "config.json").write_text(json.dumps({"batch_size": 8}))  # sparsify's run config
    torch.save({"step": torch.tensor(3)}, run / "state.pt")  # trainer state: not an autoencoder
    saes = load(run, dtype=F64)
    assert isinstance(saes, dict) and sorted(saes) == ["layers.0", "layers.1"]
    x = rows()
    for name, t in (("layers.0", t0), ("layers.1", t1)):
        torch.testing.assert_close(saes[name](x).x_hat, sparsify_reference(t, x, K)[1])
    one = load(run, hookpoint="layers.1", dtype=F64)
    torch.testing.assert_close(one(x).x_hat, saes["layers.1"](x).x_hat)
    assert sorted(load_sparsify_dir(run)) == ["layers.0", "layers.1"]
    assert detect_format(run) == "folder" and detect_format(run / "layers.0") == "sparsify"
    with pytest.raises(FormatError, match=r"no hookpoint 'layers.7'.*available: \['layers.0', 'layers.1'\]"):
        load(run, hookpoint="layers.7")


def test_sparsify_refusals(tmp_path):
    write_sparsify(tmp_path / "skip", skip_connection=True)
    with pytest.raises(FormatError, match="skip connection"):
        load(tmp_path / "skip")
    # transcoders load (tests/test_transcoder.py); a skip connection on a plain autoencoder is refused above
    write_sparsify(tmp_path / "gm", activation="groupmax")
    with pytest.raises(FormatError, match="'groupmax'.*TopK autoencoders only"):
        load(tmp_path / "gm")
    write_sparsify(tmp_path / "bad", d_in=D + 1)
    with pytest.raises(FormatError, match="does not match encoder.weight"):
        load(tmp_path / "bad")
    write_sparsify(tmp_path / "bigk", k=N + 1)
    with pytest.raises(FormatError, match="larger than n_latents"):
        load(tmp_path / "bigk")


# ---------------------------------------------------------------------------------------------- SAELens
def write_saelens(folder: Path, cfg: dict, d=D, n=N, seed=0, extra=None):
    """SAELens's save_model layout: W_enc [d_in, d_sae]."""
    folder.mkdir(parents=True)
    t = {"W_enc": rand(d, n, seed=seed), "b_enc": rand(n, seed=seed + 1, scale=0.1),
         "W_dec": rand(n, d, seed=seed + 2), "b_dec": rand(d, seed=seed + 3, scale=0.5), **(extra or {})}
    save_file(t, str(folder / "sae_weights.safetensors"))
    base = {"d_in": d, "d_sae": n, "dtype": "float32", "device": "cpu", "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "context_size": 128}
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return t


def LN(x, eps=1e-5):
    """openai/sparse_autoencoder's LN (also SAELens's normalize_activations='layer_norm')."""
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    return x / (std + eps), mu, std


def saelens_reference(t, cfg, x, k, factor=1.0):
    """SAELens TopK: z = ReLU(TopK(N(x) - a b_dec) W_enc + b_enc), x_hat = N^-1(z W_dec + b_dec)."""
    t = {n: v.to(x.dtype) for n, v in t.items()}
    ln = cfg.get("normalize_activations") == "layer_norm"
    sae_in, mu, std = LN(x) if ln else (x * factor, None, None)
    if cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - t["b_dec"]
    hidden_pre = sae_in @ t["W_enc"] + t["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden_pre = hidden_pre * t["W_dec"].norm(dim=-1)
    z = topk_relu(hidden_pre, k)
    feats = z / t["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else z
    if "scaling_factor" in t:
        feats = feats * t["scaling_factor"]
    out = feats @ t["W_dec"] + t["b_dec"]
    out = out * std + mu if ln else out / factor
    return z, out


SAELENS_CASES = {
    "old-style, b_dec not applied": {"architecture": "standard", "activation_fn_str": "topk",
                                     "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False,
                                     "normalize_activations": "none", "finetuning_scaling_factor": False},
    "topk, b_dec applied": {"architecture": "topk", "k": K, "apply_b_dec_to_input": True,
                            "normalize_activations": "none"},
    "expected_average_only_in": {"architecture": "topk", "activation_fn_kwargs": {"k": K},
                                 "apply_b_dec_to_input": True, "normalize_activations": "expected_average_only_in",
                                 "norm_scaling_factor": 0.37},
    "layer_norm, b_dec not applied": {"architecture": "topk", "k": K, "apply_b_dec_to_input": False,
                                      "normalize_activations": "layer_norm"},
    "rescale_acts_by_decoder_norm": {"architecture": "topk", "k": K, "apply_b_dec_to_input": False,
                                     "normalize_activations": "none", "rescale_acts_by_decoder_norm": True},
}


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_saelens_import_matches_saelens_formula(tmp_path, case):
    cfg = SAELENS_CASES[case]
    t = write_saelens(tmp_path / "sl", cfg)
    sae = load(tmp_path / "sl", dtype=F64)
    x = rows()
    factor = cfg.get("norm_scaling_factor", 1.0)
    z_ref, out_ref = saelens_reference(t, cfg, x, K, factor)
    codes = sae.encode(x)
    torch.testing.assert_close(dense(codes, N), z_ref)
    torch.testing.assert_close(sae.decode(codes), out_ref)
    torch.testing.assert_close(sae(x).x_hat, out_ref)
    assert isinstance(sae, LayerNormTopKSAE) == (cfg["normalize_activations"] == "layer_norm")
    assert float(sae.input_scale) == pytest.approx(factor)
    assert sae.metadata["model"] == "gpt2" and sae.metadata["hook_name"] == "blocks.3.hook_resid_post"


def test_saelens_b_dec_fold_is_the_stated_formula(tmp_path):
    t = write_saelens(tmp_path / "sl", SAELENS_CASES["old-style, b_dec not applied"])
    sae = load_saelens(tmp_path / "sl", dtype=F64)
    W, b, bd = t["W_enc"].double(), t["b_enc"].double(), t["b_dec"].double()
    torch.testing.assert_close(sae.W_enc, W.T)
    torch.testing.assert_close(sae.b_enc, b + W.T @ bd)  # b_enc' = b_enc + W_enc b_dec
    torch.testing.assert_close(sae.b_dec, bd)


def test_saelens_scaling_factor_tensor_folded_into_decoder(tmp_path):
    cfg = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "apply_b_dec_to_input": True, "normalize_activations": "none", "finetuning_scaling_factor": True}
    t = write_saelens(tmp_path / "sl", cfg, extra={"scaling_factor": 0.5 + rand(N, seed=9).abs()})
    sae = load(tmp_path / "sl", dtype=F64)
    x = rows()
    z_ref, out_ref = saelens_reference(t, cfg, x, K)
    torch.testing.assert_close(dense(sae.encode(x), N), z_ref)
    torch.testing.assert_close(sae(x).x_hat, out_ref)


def test_saelens_norm_scaling_factor_tensor(tmp_path):
    cfg = {"architecture": "topk", "k": K, "normalize_activations": "expected_average_only_in"}
    t = write_saelens(tmp_path / "sl", cfg, extra={"norm_scaling_factor": torch.tensor(2.5)})
    sae = load(tmp_path / "sl", dtype=F64)
    assert float(sae.input_scale) == 2.5
    torch.testing.assert_close(sae(rows()).x_hat, saelens_reference(t, cfg, rows(), K, 2.5)[1])


def test_saelens_activation_scaler_json(tmp_path):
    cfg = {"architecture": "topk", "k": K, "normalize_activations": "expected_average_only_in"}
    t = write_saelens(tmp_path / "sl", cfg)
    (tmp_path / "sl" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.125}))
    sae = load(tmp_path / "sl", dtype=F64)
    assert float(sae.input_scale) == 0.125
    torch.testing.assert_close(sae(rows()).x_hat, saelens_reference(t, cfg, rows(), K, 0.125)[1])


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_saelens_round_trip_identical(tmp_path, scale):
    sae = make_sae(scale=scale)
    save_saelens(sae, tmp_path / "sl", hook_name="blocks.1.hook_resid_post", model_name="gpt2")
    tensors = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} and tensors["W_enc"].shape == (D, N)
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["activation_fn_kwargs"] == {"k": K} and cfg["k"] == K
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_layer"], cfg["model_name"]) == (D, N, 1, "gpt2")
    back = load(tmp_path / "sl")
    assert float(back.input_scale) == 1.0  # the scale is folded into the weights
    x = rows()
    assert_same_sae(sae, back, x)
    z_ref, out_ref = saelens_reference(tensors, cfg, x, K)  # SAELens's formula on the exported file
    torch.testing.assert_close(dense(sae.encode(x), N), z_ref)
    torch.testing.assert_close(sae(x).x_hat, out_ref)


def test_saelens_refusals(tmp_path):
    # jumprelu loads (tests/test_jumprelu.py); other architectures are refused
    write_saelens(tmp_path / "gt", {"architecture": "gated", "apply_b_dec_to_input": True})
    with pytest.raises(FormatError, match="SAELens 'gated' autoencoder.*'jumprelu', .*'matryoshka_batchtopk' only"):
        load(tmp_path / "gt")
    write_saelens(tmp_path / "std", {"architecture": "standard", "activation_fn_str": "relu"})
    with pytest.raises(FormatError, match="'standard'.*'jumprelu', .*'matryoshka_batchtopk' only"):
        load(tmp_path / "std")
    write_saelens(tmp_path / "cn", {"architecture": "topk", "k": K, "normalize_activations": "constant_norm_rescale"})
    with pytest.raises(FormatError, match="constant_norm_rescale"):
        load(tmp_path / "cn")
    write_saelens(tmp_path / "nok", {"architecture": "topk"})  # SAELens's default k = 100 > d_sae = 64
    with pytest.raises(FormatError, match="k=100 is larger than n_latents=64"):
        load(tmp_path / "nok")
    write_saelens(tmp_path / "tr", {"architecture": "topk", "k": K}, d=N, n=D)  # W_enc [64, 16] vs cfg
    (tmp_path / "tr" / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": K, "d_in": D, "d_sae": N}))
    with pytest.raises(FormatError, match=r"W_enc has shape \(64, 16\).*\[d_in, d_sae\]"):
        load(tmp_path / "tr")


# ---------------------------------------------------------------------------------------------- OpenAI
def openai_state_dict(d=D, n=N, k=K, seed=0, tied=False):
    """What openai/sparse_autoencoder's Autoencoder.state_dict() gives for a TopK autoencoder."""
    sd = {
        "pre_bias": rand(d, seed=seed, scale=0.5),
        "latent_bias": rand(n, seed=seed + 1, scale=0.1),
        "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
        "latents_activation_frequency": torch.ones(n),
        "latents_mean_square": torch.zeros(n),
        "encoder.weight": rand(n, d, seed=seed + 2),
        "activation": "TopK",
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"},
    }
    if not tied:
        sd["decoder.weight"] = rand(d, n, seed=seed + 3)
    return sd


def openai_reference(sd, x, k):
    """Autoencoder.encode / decode with normalize=True (the released TopK autoencoders)."""
    xn, mu, std = LN(x)
    enc = sd["encoder.weight"].to(x.dtype)
    dec = sd["decoder.weight"].to(x.dtype) if "decoder.weight" in sd else enc.T
    pre = F.linear(xn - sd["pre_bias"].to(x.dtype), enc, sd["latent_bias"].to(x.dtype))
    latents = topk_relu(pre, k)
    recons = F.linear(latents, dec) + sd["pre_bias"].to(x.dtype)
    return latents, recons * std + mu


@pytest.mark.parametrize("tied", [False, True])
def test_openai_matches_reference(tmp_path, tied):
    sd = openai_state_dict(tied=tied)
    torch.save(sd, tmp_path / "3.pt")
    sae = load(tmp_path / "3.pt", dtype=F64)
    assert isinstance(sae, LayerNormTopKSAE) and sae.k == K and float(sae.input_scale) == 1.0
    x = rows(seed=5).reshape(4, 10, D)  # any batch shape
    lat_ref, rec_ref = openai_reference(sd, x, K)
    codes = sae.encode(x)
    assert isinstance(codes, LNCodes) and isinstance(codes, Codes) and codes.mu.shape == (4, 10, 1)
    torch.testing.assert_close(dense(codes, N), lat_ref)
    torch.testing.assert_close(sae.decode(codes), rec_ref)
    out = sae(x)
    torch.testing.assert_close(out.x_hat, rec_ref)
    dec = (sd["decoder.weight"] if "decoder.weight" in sd else sd["encoder.weight"].T).double()
    xn_hat = F.linear(lat_ref, dec) + sd["pre_bias"].double()
    torch.testing.assert_close(out.fvu, saehook.fvu(LN(x)[0], xn_hat))  # measured in the normalised space
    assert load_openai(tmp_path / "3.pt").W_enc.dtype == torch.float32
    assert detect_format(tmp_path / "3.pt") == "openai"


def test_openai_layernorm_through_hooks(tmp_path):
    """attach() records OpenAI's latents and splices OpenAI's reconstruction, unchanged hooks."""
    model = tiny_model("gpt2")
    d = model.config.n_embd
    sd = openai_state_dict(d=d, n=4 * d, k=K, seed=3)
    torch.save(sd, tmp_path / "1.pt")
    sae = load(tmp_path / "1.pt")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = {}

    def next_block_input(module, args, kwargs):  # what flows into block 2: block 1's (spliced) output
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = model.transformer.h[2].register_forward_pre_hook(next_block_input, with_kwargs=True)
    try:
        model(ids)
        x = seen["x"]
        lat_ref, rec_ref = openai_reference(sd, x, K)
        with saehook.attach(model, {1: sae}) as hooked:
            model(ids)
            torch.testing.assert_close(seen["x"], x)  # recording only: unchanged
            torch.testing.assert_close(dense(hooked.latents[1], 4 * d), lat_ref)
            with hooked.splice():
                model(ids)
            torch.testing.assert_close(seen["x"], rec_ref)
    finally:
        handle.remove()


def test_openai_refusals_and_weights_only(tmp_path):
    sd = openai_state_dict()
    sd["activation"], sd["activation_state_dict"] = "ReLU", {}
    torch.save(sd, tmp_path / "relu.pt")
    with pytest.raises(FormatError, match="activation 'ReLU'.*TopK autoencoders only"):
        load(tmp_path / "relu.pt")
    sd = openai_state_dict()
    del sd["activation"], sd["activation_state_dict"]
    torch.save(sd, tmp_path / "nok.pt")
    with pytest.raises(FormatError, match=r"no 'activation' entry.*ReLU autoencoder.*pass load_openai\(path, k=...\)"):
        load(tmp_path / "nok.pt")
    ln = load_openai(tmp_path / "nok.pt", k=K, layernorm=True, dtype=F64)
    torch.testing.assert_close(ln(rows()).x_hat, openai_reference(sd, rows(), K)[1])
    assert type(load_openai(tmp_path / "nok.pt", k=K)) is TopKSAE  # no activation: OpenAI's normalize=False

    marker = tmp_path / "pwned"
    torch.save({"encoder.weight": torch.zeros(2, 2), "evil": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="weights_only"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()  # the pickled call was never made


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------- layer norm
def test_layernorm_sae_save_load_and_saelens_export(tmp_path):
    sae = make_sae(cls=LayerNormTopKSAE, scale=1.0)
    x = rows()
    sae.save(tmp_path / "ln")
    assert json.loads((tmp_path / "ln" / "cfg.json").read_text())["format"] == "saehook.topk-layernorm"
    with pytest.raises(saehook.SAEConfigError, match="saehook.topk-layernorm"):
        TopKSAE.load(tmp_path / "ln")  # refused, never silently loaded without its normalisation
    back = load(tmp_path / "ln")
    assert type(back) is LayerNormTopKSAE and detect_format(tmp_path / "ln") == "saehook-layernorm"
    assert_same_sae(sae, back, x)
    save_saelens(sae, tmp_path / "sl")
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["normalize_activations"] == "layer_norm"
    assert_same_sae(sae, load(tmp_path / "sl"), x)
    with pytest.raises(FormatError, match="sparsify has no per-row layer-norm"):
        save_sparsify(sae, tmp_path / "sp")


def test_lncodes_behave_like_codes():
    sae = make_sae(cls=LayerNormTopKSAE, scale=1.0)
    x = rows()
    codes = sae.encode(x)
    values, indices = codes  # still a 2-tuple
    assert len(codes) == 2 and values.shape == (40, K)
    again = pickle.loads(pickle.dumps(codes))
    torch.testing.assert_close(sae.decode(again), sae.decode(codes))
    with pytest.raises(ValueError, match="mean and std"):
        sae.decode(Codes(values, indices))
    torch.testing.assert_close(sae.decode(Codes(values, indices), mu=codes.mu, std=codes.std), sae.decode(codes))
    assert sae.set_input_scale_(x) == 1.0 and float(sae.input_scale) == 1.0
    # adding latent j's decoder row in the normalised space moves x_hat by W_dec[j] * std in the input's units
    j = 5
    bumped = LNCodes(torch.cat([values, torch.ones(40, 1, dtype=F64)], -1),
                     torch.cat([indices, torch.full((40, 1), j)], -1), codes.mu, codes.std)
    torch.testing.assert_close(sae.decode(bumped) - sae.decode(codes), sae.unscale(sae.W_dec[j].expand(40, -1), codes))
    xn = LN(x)[0]
    torch.testing.assert_close(sae.pre_acts(x), F.linear(xn - sae.b_dec, sae.W_enc, sae.b_enc))


# ---------------------------------------------------------------------------------------------- detection
def test_load_detects_every_format(tmp_path):
    sae = make_sae()
    sae.save(tmp_path / "own")
    write_sparsify(tmp_path / "sp")
    write_saelens(tmp_path / "sl", SAELENS_CASES["topk, b_dec applied"])
    torch.save(openai_state_dict(), tmp_path / "oa.pt")
    expected = {"own": ("saehook", TopKSAE), "sp": ("sparsify", TopKSAE), "sl": ("saelens", TopKSAE),
                "oa.pt": ("openai", LayerNormTopKSAE)}
    for name, (fmt, cls) in expected.items():
        assert detect_format(tmp_path / name) == fmt
        assert type(load(tmp_path / name)) is cls
    assert_same_sae(sae, load(tmp_path / "own"), rows())
    assert_same_sae(sae, load(tmp_path / "own" / "sae.safetensors"), rows())  # a file inside: its folder
    assert load(tmp_path / "sl" / "sae_weights.safetensors").k == K
    assert load(str(tmp_path / "own"), device="cpu", dtype=torch.float32).W_enc.dtype == torch.float32


def test_training_run_folder(tmp_path):
    run = tmp_path / "out"
    a, b = make_sae(seed=1), make_sae(seed=2)
    b.metadata["hookpoint"] = "model.layers.2:input"
    a.save(run / "model.layers.1")
    b.save(run / "model.layers.2_input")
    make_sae(seed=3).save(run / "checkpoints" / "step-000001" / "model.layers.1")  # skipped
    (run / "metrics.jsonl").write_text("{}\n")
    saes = load(run)
    assert sorted(saes) == ["model.layers.1", "model.layers.2_input"]
    x = rows()
    assert_same_sae(load(run, hookpoint="model.layers.2:input"), b, x)  # the hookpoint, or its folder name
    assert_same_sae(load(run, hookpoint="model.layers.1"), a, x)
    assert_same_sae(load(run / "model.layers.1", hookpoint="model.layers.1"), a, x)
    with pytest.raises(FormatError, match="single autoencoder.*not a folder with hookpoint 'model.layers.5'"):
        load(run / "model.layers.1", hookpoint="model.layers.5")
    only = tmp_path / "only"
    a.save(only / "model.layers.1")
    assert isinstance(load(only), TopKSAE)  # one hookpoint: the autoencoder itself


def test_nested_saelens_release_folder(tmp_path):
    write_saelens(tmp_path / "rel" / "blocks.3.hook_resid_post", SAELENS_CASES["topk, b_dec applied"])
    write_saelens(tmp_path / "rel" / "blocks.4.hook_resid_post", SAELENS_CASES["topk, b_dec applied"], seed=4)
    assert sorted(load(tmp_path / "rel")) == ["blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]
    assert load(tmp_path / "rel", hookpoint="blocks.4.hook_resid_post").k == K


def test_openai_folder_of_layers(tmp_path):
    torch.save(openai_state_dict(seed=0), tmp_path / "0.pt")
    torch.save(openai_state_dict(seed=7), tmp_path / "1.pt")
    assert sorted(load(tmp_path)) == ["0", "1"]
    sd = openai_state_dict(seed=7)
    torch.testing.assert_close(load(tmp_path, hookpoint=1, dtype=F64)(rows()).x_hat,
                               openai_reference(sd, rows(), K)[1])


def test_load_errors(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    (tmp_path / "junk" / "weights.npz").write_bytes(b"\0")
    with pytest.raises(FormatError) as e:
        load(tmp_path / "junk")
    msg = str(e.value)
    assert "notes.txt" in msg and "weights.npz" in msg
    for known in ("saehook", "sparsify", "SAELens", "OpenAI"):
        assert known in msg
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text("{}")
    with pytest.raises(FormatError, match="a cfg.json without sae.safetensors or sae_weights.safetensors"):
        load(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a Hugging Face Hub repo id"):
        load(tmp_path / "missing" / "deeper" / "sae")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_text("{not json")
    (bad / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(FormatError, match="not valid JSON"):
        load(bad)
    (bad / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": K}))
    with pytest.raises(FormatError, match="unreadable or truncated"):
        load(bad)


def test_hub_id_resolves_through_snapshot_download_cache(tmp_path):
    """A Hub id goes through huggingface_hub.snapshot_download; here it is served from a local cache (no network:
    HF_HUB_OFFLINE=1 in conftest, and a cached snapshot is used when the Hub is unreachable)."""
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--some-saes"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    t = write_sparsify(snap / "layers.1")
    write_sparsify(snap / "layers.2", seed=3)
    sae = load("someorg/some-saes", hookpoint="layers.1", cache_dir=cache, dtype=F64)
    torch.testing.assert_close(sae(rows()).x_hat, sparsify_reference(t, rows(), K)[1])
    assert sorted(load("someorg/some-saes", cache_dir=cache)) == ["layers.1", "layers.2"]
    with pytest.raises(FormatError, match="no hookpoint 'layers.9' in Hub repo someorg/some-saes"):
        load("someorg/some-saes", hookpoint="layers.9", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="taken as a Hugging Face Hub repo id"):
        load("someorg/not-cached", cache_dir=cache)


# ---------------------------------------------------------------------------------------------- hub card
def test_model_card_content():
    sae = make_sae()
    sae.metadata.update(model="HuggingFaceTB/SmolLM2-135M", dead_fraction=0.01)
    card = model_card(sae, repo_id="me/smollm2-saes", hookpoint="model.layers.1")
    assert card.startswith("---\nlibrary_name: saehook\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in card
    assert "`model.layers.1`" in card and "| Tokens trained on | 1,234 |" in card
    assert f"| Active latents per row (k) | {K} |" in card and f"| Latents (n_latents) | {N} |" in card
    assert "| fvu | 0.25 |" in card and "| dead_fraction | 0.01 |" in card
    assert "scalar input scale s = 0.7" in card
    assert 'saehook.load("me/smollm2-saes", hookpoint="model.layers.1")' in card
    ln_card = model_card(make_sae(cls=LayerNormTopKSAE, scale=1.0))
    assert "layer norm" in ln_card and "path/to/this/folder" in ln_card
    bare = TopKSAE(D, N, K)
    assert "not recorded" in model_card(bare) and "No evaluation metrics" in model_card(bare)


def test_save_with_card(tmp_path):
    sae = make_sae()
    out = save_with_card(sae, tmp_path / "shared")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "cfg.json", "sae.safetensors"]
    assert (out / "README.md").read_text() == model_card(sae)
    assert_same_sae(sae, load(out), rows())  # the README does not disturb loading


def test_layernorm_sae_steer_and_ablate_scale_by_row_std():
    """Edits on a layer-norm autoencoder are un-normalised with each row's std, like its decode."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    sae = LayerNormTopKSAE(32, 64, 4)
    ids = torch.randint(3, 128, (2, 6))
    layer = model.model.layers[1]
    outs = []
    with saehook.attach(model, {1: sae}, record=False) as hooked:
        h = layer.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
        model(ids)
        with hooked.steer({1: {5: 2.0}}):
            model(ids)
        h.remove()
    clean, steered = outs
    std = sae.layer_norm(clean)[2]
    torch.testing.assert_close(steered - clean, 2.0 * sae.W_dec[5] * std, atol=1e-5, rtol=1e-5)
