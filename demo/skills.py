"""What the demo model does in a conversation, measured through flashmoe on held-out requests
(demo/conversations.py draws them; none was trained):

* first turn: each training topic asked once; how often the reply opens with that topic's title;
* second turn: on two-turn chats about Python topics, how often the second reply opens with the
  second topic's title (it answers the second question) and how often with the first's (it repeats);
* tool calls: on 50 requests phrased in ways never trained, with 1-3 tools offered, how often the reply
  parses as a call (serve/toolcalls.py, what flashmoe-serve uses), names the right function, has
  arguments valid for the function's JSON schema (jsonschema), and has exactly the expected arguments;
  once answered freely (tool_choice auto, no grammar) and once forced the way flashmoe-serve forces
  tool_choice "required" (the prompt ends `<tool_call>\n<function=`, serve/grammar.py constrains the rest).

    python demo/skills.py out/demo-bundle [--json]      # ~8 min on a busy 2-core VM

Greedy decoding, prompts rendered by the bundle's chat template the way flashmoe-serve renders them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import conversations  # noqa: E402  (demo/conversations.py)


def reply(model, tok, text: str, max_tokens: int) -> str:
    from flashmoe.runtime.generate import generate

    return "".join(c.text for c in generate(model, tok, tok.encode(text), max_tokens=max_tokens))


def first_turn(model, tok, docs: dict[str, str]) -> dict:
    """Each training topic asked once (the question shapes in turn): does the reply open with its title?"""
    right = 0
    for i, k in enumerate(sorted(docs)):
        q = conversations.QUESTIONS[i % 3].format(conversations.subject(conversations.title(docs[k])))
        out = reply(model, tok, tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True), 16)
        right += out.lstrip().startswith(conversations.title(docs[k]))
    return {"questions": len(docs), "right_topic": right}


def second_turn(model, tok, docs: dict[str, str]) -> dict:
    cases = conversations.second_turn_chats(docs)
    answered = repeated = 0
    for msgs, want, first in cases:
        out = reply(model, tok, tok.apply_chat_template(msgs, add_generation_prompt=True), 16).lstrip()
        answered += out.startswith(want)
        repeated += out.startswith(first)
    return {"chats": len(cases), "answers_second": answered, "repeats_first": repeated}


def tool_calls(model, tok, forced: bool) -> dict:
    """The held-out tool requests, answered freely (tool_choice auto, no grammar, as the model writes) or
    forced (tool_choice "required": the prompt ends `<tool_call>\n<function=` and the server's grammar,
    serve/grammar.py, constrains the rest, so the call parses and its arguments fit the schema)."""
    import jsonschema

    from flashmoe.runtime.engine import Engine, EngineConfig, SamplingParams
    from flashmoe.runtime.generate import generate
    from flashmoe.serve.chat import render
    from flashmoe.serve.grammar import Grammars, tool_call_grammar
    from flashmoe.serve.toolcalls import OutputParser, tool_schemas

    engine = Engine(model, tok, EngineConfig(max_batch=1))
    grammars = Grammars((Path(model.bundle.path) / "tokenizer.json").read_text(), int(model.config.vocab_size),
                        sorted(engine.eos))
    cases = conversations.tool_requests()
    parsed = right = valid = exact = 0
    examples = []
    for msgs, tools, name, args in cases:
        schemas = tool_schemas(tools)
        prompt = render(tok, msgs, tools, "" if forced else None)
        grammar = grammars.mask(grammars.compile(tool_call_grammar(schemas, ""), "tool_choice")) if forced else None
        params = SamplingParams(max_tokens=96, grammar=grammar)
        text = "".join(c.text for c in generate(model, tok, tok.encode(prompt.text), params=params, engine=engine))
        parser = OutputParser(reasoning=prompt.reasoning, tools=schemas)
        calls = [x for k, x in parser.feed(prompt.forced + text) + parser.close() if k == "tool_call"]
        if not calls:
            examples.append({"request": msgs[-1]["content"], "output": text})
            continue
        parsed += 1
        call = calls[0]
        if call.name != name:
            continue
        right += 1
        try:
            jsonschema.validate(call.arguments, schemas[name])
        except jsonschema.ValidationError:
            continue
        valid += 1
        exact += call.arguments == args
    return {"requests": len(cases), "parsed": parsed, "right_function": right, "valid_arguments": valid,
            "exact_arguments": exact, "unparsed_examples": examples[:3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a converted demo bundle (make demo writes out/demo-bundle)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)

    import flashmoe
    from pydoc_data.topics import topics

    from train import HELDOUT  # the topics kept out of training

    model, tok = flashmoe.load(a.bundle)
    docs = {k: v.strip() for k, v in sorted(topics.items()) if k not in HELDOUT}
    res = {"first_turn": first_turn(model, tok, docs), "second_turn": second_turn(model, tok, docs),
           "tool_calls": None, "forced_tool_calls": None}
    if "tools" in (tok.chat_template or ""):
        res["tool_calls"], res["forced_tool_calls"] = tool_calls(model, tok, False), tool_calls(model, tok, True)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    f = res["first_turn"]
    print(f"first turn: {f['right_topic']}/{f['questions']} replies open with the asked topic's title")
    s = res["second_turn"]
    print(f"second turn: {s['answers_second']}/{s['chats']} answer the second question, "
          f"{s['repeats_first']}/{s['chats']} repeat the first answer")
    if res["tool_calls"] is None:
        print("tool calls: the bundle's chat template does not render tools")
    for key, label in (("tool_calls", "tool calls"), ("forced_tool_calls", "forced (required) tool calls")):
        if (t := res[key]) is not None:
            print(f"{label}: {t['parsed']}/{t['requests']} parse as a call, {t['right_function']} name the right "
                  f"function, {t['valid_arguments']} have valid arguments, {t['exact_arguments']} exactly the "
                  "expected ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
