"""An experiment, not the shipped demo: the demo architecture trained on conversations and Qwen3.5 tool
calls as well as on Python's help topics (demo/conversations.py), with Qwen3.5's tool chat template.

    python demo/train_chat.py -o out/demo-chat       # 39 min on this project's busy 2-core VM (one thread)
    flashmoe-convert out/demo-chat -o out/demo-chat-bundle && python demo/skills.py out/demo-chat-bundle

Its measurements (demo/README.md, "Conversations and tool calls"): at 450 steps it learned the call
syntax but not to copy arguments or to pick the asked topic, so demo/model stays the train.py model.

Same corpus of topics and the same tokenizer training, model config and held-out topics as train.py;
besides the plain topic text the model sees single- and multi-turn questions about the topics and
requests answered by tool calls, rendered by transformers through conversations.TEMPLATE. Loss is
taken on the plain text and on the assistant's turns only. Each training window starts at a sample's
start (or every SEQ/2 tokens inside a long topic), so a tool request is seen whole with the tool list.
Needs torch and transformers (`pip install -e ".[test]"`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import conversations  # demo/conversations.py, next to this file
from train import CONFIG, HELDOUT, build_tokenizer, topics  # demo/train.py: the shipped demo's recipe


def render(msgs: list[dict], tools: list[dict] | None = None) -> str:
    """A conversation as the chat template writes it, rendered by transformers (the reference renderer)."""
    global _RENDERER  # built once: transformers only renders the template here
    if _RENDERER is None:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        _RENDERER = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=conversations.TEMPLATE)
    return _RENDERER.apply_chat_template(msgs, tools=tools, tokenize=False)


_RENDERER = None


def corpus(docs: dict[str, str], rng: random.Random, multi: int, tool: int) -> tuple[list[str], list[str]]:
    """(plain topic texts, rendered chats), the chats shuffled."""
    plain = [v + "<|endoftext|>" for v in docs.values()]
    convs = [render(m) for m in conversations.chats(docs, rng, multi)] + [render(m, t) for m, t in conversations.tool_chats(tool, rng, docs)]
    rng.shuffle(convs)
    return plain, convs


def assistant_mask(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """1 for tokens inside an assistant turn's content (and its closing <|im_end|>), else 0."""
    spans, at = [], 0
    opener, close = "<|im_start|>assistant\n", "<|im_end|>"
    while (i := text.find(opener, at)) >= 0:
        j = text.find(close, i)
        j = len(text) if j < 0 else j + len(close)
        spans.append((i + len(opener), j))
        at = j
    return [int(any(a <= s < b for a, b in spans)) for s, _ in offsets]


def stream(tok, plain: list[str], convs: list[str], seq: int, rng: random.Random):
    """(token ids, loss mask, window starts): every sample concatenated in random order; a window starts
    at each chat and every seq//2 tokens of a plain topic."""
    pieces = [(s, False) for s in plain] + [(s, True) for s in convs]
    rng.shuffle(pieces)
    ids, mask, starts = [], [], []
    for text, chat in pieces:
        enc = tok.encode(text)
        n = len(enc.ids)
        starts += [len(ids)] if chat else [len(ids) + k for k in range(0, n, seq // 2)]
        ids += enc.ids
        mask += assistant_mask(text, enc.offsets) if chat else [1] * n
    return ids, mask, [s for s in starts if s + seq + 1 <= len(ids)]


def save(model, tok, out: Path) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)  # config.json, generation_config.json, model.safetensors
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": conversations.TEMPLATE}, indent=1) + "\n")
    (out / "chat_template.jinja").write_text(conversations.TEMPLATE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, default=Path("out/demo-chat"), help="checkpoint directory to write (default out/demo-chat)")
    p.add_argument("--steps", type=int, default=450, help="optimizer steps (default 450)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seq", type=int, default=576, help="tokens per window (default 576: a tool request fits whole)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, corpus and batch order (default 0)")
    p.add_argument("--multi", type=int, default=700, help="multi-turn topic conversations (default 700)")
    p.add_argument("--tool-chats", type=int, default=1400, help="tool-call conversations (default 1400)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy machine more threads stall each other)")
    a = p.parse_args(argv)

    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.set_num_threads(a.threads)
    docs = topics()
    train_docs = {k: v for k, v in docs.items() if k not in HELDOUT}
    heldout = "\n\n".join(docs[k] for k in HELDOUT if k in docs) + "\n"  # demo/heldout.txt (train.py writes it)
    rng = random.Random(a.seed)
    plain, convs = corpus(train_docs, rng, a.multi, a.tool_chats)
    tok = build_tokenizer(list(train_docs.values()) + convs, CONFIG["vocab_size"])
    ids, mask, starts = stream(tok, plain, convs, a.seq, rng)
    longest = max(len(tok.encode(c).ids) for c in convs)
    data, weight = torch.tensor(ids), torch.tensor(mask, dtype=torch.float32)
    print(f"corpus: {len(train_docs)} topics + {len(convs)} chats = {len(ids)} tokens ({sum(mask)} with loss), "
          f"{len(starts)} window starts, longest chat {longest} tokens (vocab {tok.get_vocab_size()}); "
          f"held out: {len(tok.encode(heldout).ids)} tokens", flush=True)

    torch.manual_seed(a.seed)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**CONFIG))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({n_params * 2 / 1e6:.1f} MB in bfloat16)", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        pick = torch.randint(0, len(starts), (a.batch,), generator=g).tolist()
        x = torch.stack([data[starts[i]: starts[i] + a.seq] for i in pick])
        y = torch.stack([data[starts[i] + 1: starts[i] + a.seq + 1] for i in pick])
        w = torch.stack([weight[starts[i] + 1: starts[i] + a.seq + 1] for i in pick]).reshape(-1)
        logits = model(x).logits
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        loss = (losses * w).sum() / w.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step}/{a.steps}  loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    save(model, tok, a.output)
    with torch.no_grad():
        prompt = tok.encode(render([{"role": "user", "content": "What time is it in Oslo?"}],
                                   [conversations.TOOLS["get_time"]]) + "<|im_start|>assistant\n").ids
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    print("greedy sample:", tok.decode(out[0, len(prompt):].tolist()), flush=True)
    print(f"wrote {a.output} in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
