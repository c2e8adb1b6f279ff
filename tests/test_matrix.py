"""Every architecture x every way of running it: an edit means the same thing however the model is run.

Twelve tiny random architectures (built offline from configs) under plain forwards (right / left padding,
with / without ``position_ids``) and ``generate`` (greedy and beam search, with and without the KV cache,
chunked prefill). In every cell saehook's edits (a steer restricted to some positions and a splice at
the last prompt token, nested) are compared, to 1e-5, with a truth computed without saehook: a plain torch
hook that applies the same formulas at the token indices the edit means, on the row run alone (or, where
the model itself computes a padded row differently, on the same call).
"""

import pytest
import torch
from conftest import VOCAB

from saehook import TopKSAE, attach
from saehook.hookpoints import resolve

TOL = dict(atol=1e-5, rtol=1e-5)
LATENT, VALUE = 3, 4.0
ROWS = (7, 4)  # real tokens per row of the padded batch
NEW = 3  # tokens generated


def build(arch: str):
    """A random causal LM: width 32, 2 layers, 4 heads, vocabulary 128, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    c = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, **c)
    cfg = {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "mistral": lambda: tf.MistralConfig(sliding_window=None, **llama_like),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, sliding_window=64, **llama_like),
        "phi3": lambda: tf.Phi3Config(**llama_like),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **c),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64, **c),
        "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, **c),
        "gpt_neo": lambda: tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                           attention_types=[[["global", "local"], 1]], window_size=64,
                                           max_position_embeddings=64, **c),
        "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **c),
        "opt": lambda: tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                    word_embed_proj_dim=32, max_position_embeddings=64, **c),
        "falcon": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=64, **c),
    }[arch]()
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().requires_grad_(False)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # always NEW tokens, and beam scores are plain sums
    return model


ABSOLUTE = {"gpt2", "gpt_neo"}  # learned position embeddings, taken from position_ids (0.. without them)
ARCHS = ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox", "gptj", "gpt_neo", "bloom", "opt",
         "falcon"]
FORWARD = [f"{side}-{pos}" for side in ("right", "left") for pos in ("position_ids", "no_position_ids")]
GENERATE = ["greedy-cache", "greedy-no_cache", "greedy-chunked_prefill", "beam-cache", "beam-no_cache"]


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    model = build(request.param)
    torch.manual_seed(1)
    sae = TopKSAE(32, 64, 4)
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # some latents fire everywhere, so the splice changes things
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in ROWS]
    return request.param, model, sae, rows


# ---------------------------------------------------------------------------------------------- the truth
def truth(model, sae, ids, steer_at, splice_at, **kw):
    """Logits of ``model(ids, **kw)`` with a plain torch hook on layer 0's output: steer ``x + v W_dec[j]``
    at ``steer_at`` and splice ``x_hat`` at ``splice_at`` (bool ``[B, T]`` each; they never overlap)."""
    layer = resolve(model, 0).module

    def hook(mod, args, out):
        x = out if isinstance(out, torch.Tensor) else out[0]
        y = x + steer_at.unsqueeze(-1) * (VALUE * sae.W_dec[LATENT])
        y = torch.where(splice_at.unsqueeze(-1), sae.decode(sae.encode(x)), y)
        return y if isinstance(out, torch.Tensor) else (y, *out[1:])

    h = layer.register_forward_hook(hook)
    try:
        return model(ids, **kw).logits
    finally:
        h.remove()


def alone(model, sae, row, steer_from, steer_to, splice):
    """The truth for one unpadded row: steer positions ``steer_from <= p < steer_to``, splice at ``splice``."""
    p = torch.arange(len(row))
    return truth(model, sae, row[None], ((p >= steer_from) & (p < steer_to))[None], (p == splice)[None])[0]


def padded(rows, side):
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- plain forwards
@pytest.mark.parametrize("mode", FORWARD)
def test_forward(setup, mode):
    """Steer positions 1..2 (``slice(1, 3)``) and splice the last real token (``[-1]``) of each row."""
    arch, model, sae, rows = setup
    side, pos = mode.split("-")
    ids, mask = padded(rows, side)
    kw = {"attention_mask": mask}
    if pos == "position_ids":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    with attach(model, {0: sae}) as hooked, hooked.steer({0: {LATENT: VALUE}}, positions=slice(1, 3)), \
            hooked.splice(positions=[-1]):
        got = model(ids, **kw).logits
    p = mask.cumsum(-1) - 1
    n = mask.sum(-1, keepdim=True)
    same = truth(model, sae, ids, mask.bool() & (p >= 1) & (p < 3), mask.bool() & (p == n - 1), **kw)
    real = mask.bool()
    torch.testing.assert_close(got[real], same[real], **TOL)
    clean_padded = model(ids, **kw).logits
    assert (got - clean_padded)[real].abs().max() > 1e-3  # the edits act
    for i, r in enumerate(rows):
        if (clean_padded[i][real[i]] - model(r[None]).logits[0]).abs().max() > 1e-5:
            # the model itself numbers a left-padded row from its padding (absolute positions): only the
            # same call is a truth there
            assert side == "left" and pos == "no_position_ids" and arch in ABSOLUTE, (arch, mode)
            continue
        torch.testing.assert_close(got[i][real[i]], alone(model, sae, r, 1, 3, len(r) - 1), **TOL)


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("mode", GENERATE)
def test_generate(setup, mode):
    """Steer the generated tokens (``"generated"``) and splice the last prompt token (``[-1]``), in a
    left-padded batch of two prompts; the truth is one full forward of each row alone over its prompt and
    generated tokens with the same edits at those indices."""
    arch, model, sae, rows = setup
    search, cache = mode.split("-")
    ids, mask = padded(rows, "left")
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
              use_cache=cache != "no_cache")
    if cache == "chunked_prefill":
        kw["prefill_chunk_size"] = 2
    if search == "beam":
        kw.update(num_beams=2, length_penalty=0.0, output_scores=True)
    else:
        kw.update(output_logits=True)
    with attach(model, {0: sae}) as hooked, hooked.steer({0: {LATENT: VALUE}}, positions="generated"), \
            hooked.splice(positions=[-1]):
        out = model.generate(ids, **kw)
    T = ids.shape[1]
    for i, r in enumerate(rows):
        seq = torch.cat([r, out.sequences[i, T:]])  # the row without its padding
        full = alone(model, sae, seq, len(r), len(seq), len(r) - 1)
        assert (full - model(seq[None]).logits[0])[len(r) - 1:].abs().amax(-1).min() > 1e-4  # edits act
        if search == "greedy":
            got = torch.stack([step[i] for step in out.logits])  # [NEW, V]
            torch.testing.assert_close(got, full[len(r) - 1:-1], **TOL)
        else:  # the beam's score (length_penalty=0: the sum of its tokens' log-probabilities)
            logp = full[len(r) - 1:-1].log_softmax(-1).gather(-1, seq[len(r):, None]).sum()
            torch.testing.assert_close(out.sequences_scores[i], logp, **TOL)


def test_matrix_size():
    """The matrix's cells (the count quoted in the notes)."""
    assert len(ARCHS) * (len(FORWARD) + len(GENERATE)) == 108
