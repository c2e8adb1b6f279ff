"""``matmul_dtype="auto"`` (the default): bfloat16 only where the device multiplies it natively, logged per run."""

import json
import logging

import pytest
import torch
from conftest import source, tiny_model

import saehook
from saehook import TopKSAE, TrainConfig
from saehook.hardware import auto_dtype, bf16_native, cpu_flags
from saehook.trainer import SAETrainer

AVX2_ONLY = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512bw"  # AVX-512 without BF16


@pytest.mark.parametrize("flags, native", [
    ("fpu sse2 avx2 amx_bf16 amx_tile amx_int8", True),     # Sapphire Rapids: AMX
    ({"avx2", "avx512f", "avx512_bf16"}, True),              # Cooper Lake / Zen 4: AVX512-BF16
    (["AVX512_BF16"], True),
    (AVX2_ONLY, False),
    ("", False),
])
def test_resolver_is_a_pure_function_of_the_cpu_flags(flags, native):
    assert bf16_native(flags) is native
    assert auto_dtype("auto", "cpu", flags=flags) == ("bfloat16" if native else "float32")
    assert auto_dtype("float32", "cpu", flags=flags) == "float32"  # an explicit dtype is kept
    assert auto_dtype("bfloat16", "cpu", flags=AVX2_ONLY) == "bfloat16"


def test_auto_is_the_default_and_resolves_per_device():
    assert TrainConfig().matmul_dtype == "auto"
    here = "bfloat16" if bf16_native(cpu_flags()) else "float32"
    trainer = SAETrainer(TopKSAE(16, 64, 4), TrainConfig(batch_tokens=256))
    assert trainer.matmul_dtype == here
    assert SAETrainer(TopKSAE(16, 64, 4), TrainConfig(matmul_dtype="bfloat16")).matmul_dtype == "bfloat16"
    with pytest.raises(ValueError, match="matmul_dtype must be 'auto', 'float32', 'bfloat16' or 'float16'"):
        TrainConfig(matmul_dtype="fp8")


def test_this_cpu_trains_in_float32_and_the_run_says_so(tmp_path, caplog):
    """On an AVX2 machine (this one) auto means float32: the step equals an explicit float32 step, and the
    log and train_config.json name the dtype used."""
    if bf16_native(cpu_flags()):
        pytest.skip("this CPU multiplies bf16 natively; auto resolves to bfloat16 here")
    torch.manual_seed(0)
    sae = TopKSAE(32, 128, 4)
    with caplog.at_level(logging.INFO, logger="saehook.trainer"), saehook.attach(tiny_model("llama"), {1: sae}) as h:
        h.train(source(8), tokens=1024, config=TrainConfig(batch_tokens=256), out=tmp_path, progress=False)
    assert "model.layers.1: encoder matmul in float32 (matmul_dtype='auto' on cpu)" in caplog.text
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["matmul_dtype"] == "auto" and saved["matmul_dtype_used"] == {"model.layers.1": "float32"}

    x = torch.randn(256, 32)
    a, b = TopKSAE(32, 128, 4), TopKSAE(32, 128, 4)
    b.load_state_dict(a.state_dict())
    SAETrainer(a, TrainConfig(batch_tokens=256)).step(x)
    SAETrainer(b, TrainConfig(batch_tokens=256, matmul_dtype="float32")).step(x)
    torch.testing.assert_close(a.W_enc, b.W_enc, rtol=0, atol=0)
