"""An experiment, not the shipped demo: fine-tune the demo model on conversations and Qwen3.5 tool calls,
keeping what it learned from train.py.

    python demo/train_chat.py -o out/demo-chat      # from demo/model; 20 min on this project's busy 2-core VM
    flashmoe-convert out/demo-chat -o out/demo-chat-bundle && python demo/skills.py out/demo-chat-bundle

    # then 150 steps on tool requests only, from that model (6 min more):
    python demo/train_chat.py --init out/demo-chat --seed 1 --steps 150 --multi 0 --tool-chats 600 -o out/demo-chat2

Its measurements (demo/README.md, "Conversations and tool calls"): first turns kept, more second turns
answered, the call syntax learned, but the function chosen barely better than chance (34/50 vs 30) and the
argument copied in 9/50, so demo/model stays the train.py model.

Starts FROM a trained checkpoint (`--init`, default demo/model, the train.py model) and keeps its tokenizer
and config. Every step trains on two things at once:

* the original stream of train.py (the help topics as plain text and as single-turn chats, the same
  shuffle and `--seq`-token windows), so first-turn answers hold;
* whole conversations rendered by the chat template (conversations.TEMPLATE, Qwen3.5's tool format):
  multi-turn topic chats and tool requests answered by calls (demo/conversations.py), padded, with the
  loss on the assistant's turns only.

Fixed steps and seeds (corpus, batch order); one CPU thread by default. Needs torch and transformers
(`pip install -e ".[test]"`). Measurements and the command that rebuilt demo/model: demo/README.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import conversations  # demo/conversations.py, next to this file
from train import HELDOUT, HERE, optimize, original_corpus, save, topics, windows  # demo/train.py

_RENDERER = None


def render(msgs: list[dict], tools: list[dict] | None = None) -> str:
    """A conversation as the chat template writes it, rendered by transformers (the reference renderer)."""
    global _RENDERER  # built once: transformers only renders the template here
    if _RENDERER is None:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        _RENDERER = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=conversations.TEMPLATE)
    return _RENDERER.apply_chat_template(msgs, tools=tools, tokenize=False)


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


def conversation_corpus(tok, docs: dict[str, str], seed: int, multi: int, tool: int, limit: int):
    """[(token ids, loss mask)] of `multi` multi-turn topic chats and `tool` tool conversations, shuffled;
    conversations longer than `limit` tokens are left out."""
    rng = random.Random(seed)
    texts = [render(m) for m in conversations.chats(docs, rng, multi)[3 * len(docs):]]  # multi-turn only
    texts += [render(m, t) for m, t in conversations.tool_chats(tool, rng, docs)]
    rng.shuffle(texts)
    out = []
    for text in texts:
        enc = tok.encode(text)
        if len(enc.ids) <= limit:
            out.append((enc.ids, assistant_mask(text, enc.offsets)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, default=Path("out/demo-chat"), help="checkpoint directory to write (default out/demo-chat)")
    p.add_argument("--init", type=Path, default=HERE / "model", help="checkpoint to start from (default demo/model)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch", type=int, default=4, help="windows of the original stream per step (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per window of the original stream (default 128)")
    p.add_argument("--conv-batch", type=int, default=4, help="conversations per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed for corpus and batch order (default 0)")
    p.add_argument("--multi", type=int, default=100, help="multi-turn topic conversations (default 100)")
    p.add_argument("--tool-chats", type=int, default=700, help="tool-call conversations (default 700)")
    p.add_argument("--limit", type=int, default=800, help="longest conversation trained, in tokens (default 800)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy machine more threads stall each other)")
    a = p.parse_args(argv)

    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3_5MoeForCausalLM

    torch.set_num_threads(a.threads)
    tok = Tokenizer.from_file(str(a.init / "tokenizer.json"))
    model = Qwen3_5MoeForCausalLM.from_pretrained(a.init, dtype=torch.float32)
    ids, _ = original_corpus(tok, a.seed)
    data = torch.tensor(ids)
    docs = {k: v for k, v in topics().items() if k not in HELDOUT}
    convs = conversation_corpus(tok, docs, a.seed, a.multi, a.tool_chats, a.limit)
    print(f"original stream: {len(ids)} tokens; conversations: {len(convs)}, "
          f"{sum(len(i) for i, _ in convs)} tokens ({sum(sum(m) for _, m in convs)} with loss)", flush=True)
    g = torch.Generator().manual_seed(a.seed)
    ce = torch.nn.functional.cross_entropy

    def step_loss(step):
        x, y = windows(data, a.batch, a.seq, g)
        logits = model(x).logits
        plain = ce(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        batch = [convs[((step - 1) * a.conv_batch + k) % len(convs)] for k in range(a.conv_batch)]
        n = max(len(i) for i, _ in batch) - 1
        x = torch.tensor([i[:-1] + [0] * (n - len(i) + 1) for i, _ in batch])
        y = torch.tensor([i[1:] + [0] * (n - len(i) + 1) for i, _ in batch])
        w = torch.tensor([m[1:] + [0] * (n - len(m) + 1) for _, m in batch], dtype=torch.float32).reshape(-1)
        logits = model(x).logits
        chat = (ce(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none") * w).sum() / w.sum().clamp(min=1)
        return plain + chat

    t0 = time.time()
    optimize(model, a.steps, a.lr, step_loss)
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
