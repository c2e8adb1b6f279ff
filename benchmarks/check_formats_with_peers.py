"""Interop check against the real peer libraries (needs the benchmark-only venv with eai-sparsify and sae-lens):
saehook -> sparsify / SAELens files load in those libraries with the same reconstructions, and their own files
load in saehook; the same both ways for SAELens's jumprelu architecture (saehook.JumpReLUSAE), its batchtopk and
matryoshka_batchtopk (saehook.BatchTopKSAE / MatryoshkaBatchTopKSAE), and sparsify's transcoders with a skip
connection (saehook.transcoder.SkipTranscoder); dictionary_learning's BatchTopK, Matryoshka and JumpReLU ae.pt
refused, their state dicts converted (saehook.formats.dictionary_learning.from_state_dict).

    .venv-bench/bin/python benchmarks/check_formats_with_peers.py
"""

import tempfile
from pathlib import Path

import torch
from sae_lens import SAE, JumpReLUSAEConfig, TopKSAEConfig
from sparsify import SparseCoder, SparseCoderConfig

import saehook
from saehook.formats import save_saelens, save_sparsify

tmp = Path(tempfile.mkdtemp())
torch.manual_seed(0)
x = torch.randn(10, 16)
sae = saehook.TopKSAE(16, 64, 4)
with torch.no_grad():
    sae.b_enc.normal_(0, 0.1)
    sae.b_dec.normal_(0, 0.3)
    sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
    sae.input_scale.fill_(0.5)
ref = sae.decode(sae.encode(x))
results = {}

save_sparsify(sae, tmp / "sp")
results["saehook -> sparsify"] = (SparseCoder.load_from_disk(tmp / "sp", device="cpu")(x).sae_out - ref)
save_saelens(sae, tmp / "sl", hook_name="blocks.1.hook_resid_post", model_name="tiny")
results["saehook -> sae-lens"] = SAE.load_from_disk(str(tmp / "sl"), device="cpu")(x) - ref

sc = SparseCoder(16, SparseCoderConfig(num_latents=64, k=4), device="cpu")
with torch.no_grad():
    sc.encoder.bias.normal_(0, 0.1)
    sc.b_dec.normal_(0, 0.3)
sc.save_to_disk(tmp / "real_sp" / "layers.3")
s = saehook.load(tmp / "real_sp", hookpoint="layers.3")
results["sparsify -> saehook"] = s.decode(s.encode(x)) - sc(x).sae_out

sl = SAE.from_dict(TopKSAEConfig(d_in=16, d_sae=64, k=4, dtype="float32", device="cpu",
                                 apply_b_dec_to_input=False).to_dict())
with torch.no_grad():
    for p in sl.parameters():
        p.normal_(0, 0.3)
sl.save_model(str(tmp / "real_sl"))
s2 = saehook.load(tmp / "real_sl")
results["sae-lens -> saehook"] = s2.decode(s2.encode(x)) - sl(x)

jr = saehook.JumpReLUSAE(16, 64, 64)  # the cap k = n_latents: SAELens's JumpReLU has none
with torch.no_grad():
    jr.W_enc.add_(0.2 * torch.randn_like(jr.W_enc))
    jr.b_enc.normal_(0, 0.1)
    jr.b_dec.normal_(0, 0.3)
    jr.log_threshold.copy_(torch.rand(64).add_(0.2).log())
    jr.input_scale.fill_(0.5)
save_saelens(jr, tmp / "jr", hook_name="blocks.1.hook_resid_post", model_name="tiny")
real_jr = SAE.load_from_disk(str(tmp / "jr"), device="cpu")
assert type(real_jr).__name__ == "JumpReLUSAE", type(real_jr)
l0 = float((jr.encode(x).values > 0).sum(-1).float().mean())
print(f"jumprelu: L0 {l0:.1f} of 64 on these rows")
results["saehook jumprelu -> sae-lens"] = real_jr(x) - jr.decode(jr.encode(x))
sl_jr = SAE.from_dict(JumpReLUSAEConfig(d_in=16, d_sae=64, dtype="float32", device="cpu",
                                        apply_b_dec_to_input=False).to_dict())
with torch.no_grad():
    for p in sl_jr.parameters():
        p.normal_(0, 0.3)
    sl_jr.threshold.uniform_(-0.1, 0.5)  # some <= 0: gate nothing ReLU keeps
sl_jr.save_model(str(tmp / "real_jr"))
s3 = saehook.load(tmp / "real_jr")
results["sae-lens jumprelu -> saehook"] = s3.decode(s3.encode(x)) - sl_jr(x)

# BatchTopK and Matryoshka BatchTopK: SAELens's training checkpoints (save_model: architecture batchtopk /
# matryoshka_batchtopk, topk_threshold, rescale_acts_by_decoder_norm on) read by saehook against SAELens's own
# inference conversion of the same weights (save_inference_model: a jumprelu at topk_threshold) run by SAELens;
# that jumprelu file read by saehook; and saehook's BatchTopK / Matryoshka written by save_saelens, run by SAELens.
from sae_lens import (  # noqa: E402
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)

for arch, cls, cfg_cls, extra in (
        ("batchtopk", BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {}),
        ("matryoshka_batchtopk", MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
         {"matryoshka_widths": [8, 24, 64]})):
    real = cls(cfg_cls(d_in=16, d_sae=64, k=4, dtype="float32", device="cpu", **extra))
    with torch.no_grad():
        for p in real.parameters():
            p.normal_(0, 0.3)
        real.topk_threshold.fill_(0.35)
    real.save_model(tmp / f"real_{arch}")
    real.save_inference_model(tmp / f"real_{arch}_inference")
    ref_sl = SAE.load_from_disk(str(tmp / f"real_{arch}_inference"), device="cpu")
    mine = saehook.load(tmp / f"real_{arch}")
    assert type(mine).__name__ == ("BatchTopKSAE" if arch == "batchtopk" else "MatryoshkaBatchTopKSAE"), type(mine)
    l0 = float((mine.encode(x).values > 0).sum(-1).float().mean())
    print(f"{arch}: L0 {l0:.1f} of 64 on these rows, prefixes {getattr(mine, 'prefixes', None)}")
    results[f"sae-lens {arch} -> saehook"] = mine.decode(mine.encode(x)) - ref_sl(x)
    inf = saehook.load(tmp / f"real_{arch}_inference")
    results[f"sae-lens {arch} inference -> saehook"] = inf.decode(inf.encode(x)) - ref_sl(x)
    ours = (saehook.MatryoshkaBatchTopKSAE(16, 64, 4, k_max=64, prefixes=[8, 24, 64]) if extra
            else saehook.BatchTopKSAE(16, 64, 4, k_max=64))  # k_max = n: SAELens's threshold has no cap
    with torch.no_grad():
        ours.W_enc.add_(0.2 * torch.randn_like(ours.W_enc))
        ours.b_enc.normal_(0, 0.1)
        ours.b_dec.normal_(0, 0.3)
        ours.input_scale.fill_(0.5)
    ours.fit_threshold_(torch.randn(256, 16))
    save_saelens(ours, tmp / f"ours_{arch}", hook_name="blocks.1.hook_resid_post", model_name="tiny")
    results[f"saehook {arch} -> sae-lens"] = (SAE.load_from_disk(str(tmp / f"ours_{arch}"), device="cpu")(x)
                                              - ours.decode(ours.encode(x)))

# transcoders: saehook's SkipTranscoder (fitted scales) -> sparsify's transcode + skip_connection, and back
from saehook.transcoder import SkipTranscoder  # noqa: E402

tc = SkipTranscoder(16, 64, 4)
with torch.no_grad():
    tc.b_enc.normal_(0, 0.1)
    tc.b_dec.normal_(0, 0.3)
    tc.W_skip.normal_(0, 0.1)
    tc.input_scale.fill_(2.0)
    tc.output_scale.fill_(0.5)
save_sparsify(tc, tmp / "tc")
results["saehook transcoder -> sparsify"] = (SparseCoder.load_from_disk(tmp / "tc", device="cpu")(x).sae_out
                                             - tc.decode(tc.encode(x)))
sc_tc = SparseCoder(16, SparseCoderConfig(num_latents=64, k=4, transcode=True, skip_connection=True), device="cpu")
with torch.no_grad():
    for p in sc_tc.parameters():
        p.normal_(0, 0.3)
sc_tc.save_to_disk(tmp / "real_tc")
s4 = saehook.load(tmp / "real_tc")
results["sparsify transcoder -> saehook"] = s4.decode(s4.encode(x)) - sc_tc(x).sae_out

# dictionary_learning (pip install --no-deps dictionary-learning==0.1.0 into .venv-bench): its ae.pt (a pickle) is
# refused by saehook.load, and the state dict, unpickled here as the refusal says, converts with the same outputs.
# Its package __init__ imports ActivationBuffer (nnsight, not installed), so the two packages are entered without
# their __init__: the autoencoder classes are its own code, unchanged.
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from saehook.formats import FormatError  # noqa: E402
from saehook.formats.dictionary_learning import from_state_dict  # noqa: E402

dl_dir = Path(importlib.util.find_spec("dictionary_learning").submodule_search_locations[0])
for pkg, where in (("dictionary_learning", dl_dir), ("dictionary_learning.trainers", dl_dir / "trainers")):
    sys.modules[pkg] = types.ModuleType(pkg)
    sys.modules[pkg].__path__ = [str(where)]
from dictionary_learning.dictionary import JumpReluAutoEncoder  # noqa: E402
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE as DLBatchTopK  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE as DLMatryoshka  # noqa: E402

for dl in (DLBatchTopK(16, 64, 4), DLMatryoshka(16, 64, 4, [8, 24, 32]), JumpReluAutoEncoder(16, 64)):
    name = type(dl).__name__
    with torch.no_grad():
        for p in dl.parameters():
            p.add_(0.1 * torch.randn_like(p))
        dl.threshold.fill_(0.3) if name != "JumpReluAutoEncoder" else dl.threshold.uniform_(-0.1, 0.4)
    run = tmp / f"dl_{name}"
    run.mkdir()
    torch.save({k: v.cpu() for k, v in dl.state_dict().items()}, run / "ae.pt")  # as dictionary_learning.training
    (run / "config.json").write_text(json.dumps({"trainer": {"dict_class": name, "k": 4}, "buffer": {}}))
    try:
        saehook.load(run)
        raise AssertionError(f"saehook.load read the pickle {run / 'ae.pt'}")
    except FormatError as e:
        assert "from_state_dict" in str(e) and name in str(e), e
    conv = from_state_dict(torch.load(run / "ae.pt", weights_only=True), name)
    conv.eval()
    print(f"dictionary_learning {name} -> saehook {type(conv).__name__}: L0 "
          f"{float((conv.encode(x).values > 0).sum(-1).float().mean()):.1f} of 64")
    results[f"dictionary_learning {name} -> saehook"] = conv.decode(conv.encode(x)) - dl(x)

for name, diff in results.items():
    err = diff.abs().max().item()
    print(f"{name:<30} max |reconstruction difference| = {err:.2e}")
    assert err < 1e-5, name
print(f"all {len(results)} directions agree")
