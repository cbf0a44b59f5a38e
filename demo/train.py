"""Rebuild the demo checkpoint in demo/model/: a small Qwen3.5-MoE trained on Python's own documentation.

    python demo/train.py                 # 47 min on a busy 2-core VM (one thread); writes demo/model/
    python demo/train.py --steps 50 -o /tmp/quick   # a quick smoke run

Dev-only: needs torch and transformers (`pip install -e ".[test]"`); `make demo` does not.

The text is `pydoc_data.topics`, the help topics every CPython ships (the Python documentation,
PSF License; see demo/README.md). Some topics are held out of training and written to
demo/heldout.txt, the text `flashmoe-eval` measures perplexity on. Besides the plain topic text, each
topic's opening also appears as a chat turn ("Tell me about the "for" statement." -> its first
paragraphs), so that the chat template and `flashmoe-run` chat produce on-topic answers. The checkpoint
carries conversations.TEMPLATE, Qwen3.5's tool template without thinking (a chat without tools renders as
the plain `<|im_start|>role\ncontent<|im_end|>` turns the model was trained on).

The model keeps the real Qwen3.5-MoE structure: Gated DeltaNet and full-attention layers (full every
4th), GQA, partial RoPE, 16 routed experts (4 per token) plus a shared expert. Training runs a fixed
number of steps with fixed seeds; torch's CPU kernels can still differ in the last bits across
machines and thread counts, so a rebuild is equivalent, not byte-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

from conversations import QUESTIONS, TEMPLATE, opening, subject, title  # demo/conversations.py, next to this file

HERE = Path(__file__).resolve().parent
HELDOUT = ("bitwise", "shifting", "unary", "power", "imaginary", "floating", "integers", "in", "truth")
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    num_hidden_layers=4,  # layers 0-2 Gated DeltaNet, layer 3 full attention
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_conv_kernel_dim=4,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    eos_token_id=1,  # <|im_end|>
    pad_token_id=0,
    bos_token_id=None,
)


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as t

    return {k: v.strip() for k, v in sorted(t.items())}


def chat_samples(docs: dict[str, str]) -> list[str]:
    """Each topic asked in every QUESTIONS shape, answered by its opening, as the chat template renders it."""
    out = []
    for text in docs.values():
        for q in QUESTIONS:
            out.append(f"<|im_start|>user\n{q.format(subject(title(text)))}<|im_end|>\n<|im_start|>assistant\n"
                       f"{opening(text)}<|im_end|>\n")
    return out


def original_corpus(tok, seed: int) -> tuple[list[int], str]:
    """(token ids, held-out text): the training topics as plain text and as single-turn chats, shuffled
    with `seed` and concatenated: the stream train.py trains on (random windows of it)."""
    docs = topics()
    train_docs = {k: v for k, v in docs.items() if k not in HELDOUT}
    heldout = "\n\n".join(docs[k] for k in HELDOUT if k in docs) + "\n"
    pieces = [v + "<|endoftext|>" for v in train_docs.values()] + chat_samples(train_docs)
    random.Random(seed).shuffle(pieces)
    ids = []
    for s in pieces:
        ids += tok.encode(s).ids
    return ids, heldout


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    return tok


def save(model, tok, out: Path) -> None:
    """The checkpoint in Hugging Face layout, written into a new folder next to `out` and renamed to `out`
    (an `out` already there, a checkpoint this script wrote before, is replaced only once the new one is whole)."""
    import tempfile

    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.to(torch.bfloat16).save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE}, indent=1) + "\n")
    (tmp / "chat_template.jinja").write_text(TEMPLATE)
    if out.is_dir() and not out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def windows(data, n: int, seq: int, g):
    """`n` random (input, target) windows of `seq` tokens from the token stream `data`."""
    import torch

    starts = torch.randint(0, len(data) - seq - 1, (n,), generator=g)
    return (torch.stack([data[s: s + seq] for s in starts]), torch.stack([data[s + 1: s + seq + 1] for s in starts]))


def optimize(model, steps: int, lr: float, step_loss, log_every: int = 25) -> None:
    """AdamW with a linear warm-up over steps/20 and a cosine decay to lr/10; `step_loss(step)` is the loss
    of one batch. Gradients clipped to norm 1."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    t0 = time.time()
    for step in range(1, steps + 1):
        loss = step_loss(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == 1:
            print(f"step {step}/{steps}  loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, default=HERE / "model", help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (default 1200)")
    p.add_argument("--batch", type=int, default=12, help="sequences per step (default 12)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batch order (default 0)")
    p.add_argument("--heldout", type=Path, default=HERE / "heldout.txt", help="where to write the held-out text")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy machine more threads stall each other)")
    a = p.parse_args(argv)

    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.set_num_threads(a.threads)
    train_docs = {k: v for k, v in topics().items() if k not in HELDOUT}
    tok = build_tokenizer(list(train_docs.values()) + chat_samples(train_docs), CONFIG["vocab_size"])
    ids, heldout = original_corpus(tok, a.seed)
    data = torch.tensor(ids)
    print(f"corpus: {len(train_docs)} topics + {3 * len(train_docs)} chat turns = {len(ids)} tokens "
          f"(vocab {tok.get_vocab_size()}); held out: {len(tok.encode(heldout).ids)} tokens", flush=True)

    torch.manual_seed(a.seed)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**CONFIG))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({n_params * 2 / 1e6:.1f} MB in bfloat16)", flush=True)
    g = torch.Generator().manual_seed(a.seed)

    def step_loss(step):
        x, y = windows(data, a.batch, a.seq, g)
        logits = model(x).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    t0 = time.time()
    optimize(model, a.steps, a.lr, step_loss)
    save(model, tok, a.output)
    a.heldout.write_text(heldout)
    with torch.no_grad():
        prompt = tok.encode('The "for" statement is used to').ids
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    print("greedy sample:", tok.decode(out[0].tolist()), flush=True)
    print(f"wrote {a.output} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
