"""Train an autoencoder as a side effect of chatting: every generate() call feeds it.

    python recipes/train_while_generating.py --rounds 20
"""

import argparse

import saehook

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--layer", type=int, default=20)
p.add_argument("--latents", type=int, default=2048)
p.add_argument("--rounds", type=int, default=20)
p.add_argument("--new-tokens", type=int, default=48)
args = p.parse_args()

import torch  # noqa: E402

model, tok = saehook.load_model(dtype=torch.bfloat16)
sae = saehook.TopKSAE(model.config.hidden_size, args.latents, 32)
questions = ["What is the capital of France?", "Write a haiku about rain.", "Explain photosynthesis briefly.",
             "Who wrote Hamlet?", "Give me three tips for learning to code.", "Why is the sky blue?"]
# the session's length is unknown: the scale and b_dec come from the first 1024 rows, not the default 32,768
config = saehook.TrainConfig(batch_tokens=512, shuffle_buffer=1024, init_samples=1024)

with saehook.attach(model, {args.layer: sae}) as hooked, hooked.training(config) as session:
    for i in range(args.rounds):
        chat = [{"role": "user", "content": questions[i % len(questions)]}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=args.new_tokens, do_sample=True, temperature=0.8)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        m = session.last.get(args.layer, {})
        print(f"[{i}] steps {session.trainers[args.layer].step_count} fvu {m.get('fvu', float('nan')):.3f} | "
              f"{answer[:60]!r}")
