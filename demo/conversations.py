"""The demo model's training conversations and the held-out requests that measure it (demo/skills.py).

Three kinds of text, all rendered through the demo's chat template (TEMPLATE, Qwen3.5's tool format):

* single- and multi-turn chats about Python's help topics: each user turn asks about one topic, the
  reply is that topic's opening paragraphs; a later turn asks about a different topic, so the model has
  to answer the latest question rather than repeat the first;
* tool calls: a request with 1-3 of the functions in TOOLS offered, answered by a call in Qwen3.5's
  syntax (`<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`);
  some continue with the tool's result (`<tool_response>` in a user turn) and a reply that uses it;
* requests where no offered tool fits, answered like a plain chat.

Each tool has request phrasings; those in HELD_PHRASINGS are never trained and make the held-out
requests of `tool_requests(heldout=True)`. `second_turn_chats()` pairs topics in orders not trained.
Everything is drawn from a seeded random.Random, so the corpus is the same on every machine.
"""

from __future__ import annotations

import json
import random

# The Qwen3.5 chat template's tool rendering (Qwen/Qwen3.5-35B-A3B chat_template.jinja: the `# Tools` system
# block with each function as JSON inside <tools></tools>, calls as <tool_call> blocks, tool results as
# <tool_response> in a user turn), without the vision parts. _MESSAGES renders the conversation; the two
# templates differ in the generation prompt only.
_MESSAGES = r"""{%- if tools and tools is iterable and tools is not mapping %}
{{- '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
{%- if messages[0].role == 'system' and messages[0].content|trim %}{{- '\n\n' + messages[0].content|trim }}{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content|trim + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- set content = message.content|trim if message.content is string else '' %}
{%- if message.role == 'user' %}
{{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' + content }}
{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{%- if loop.first %}{{- ('\n\n' if content else '') + '<tool_call>\n<function=' + tool_call.name + '>\n' }}
{%- else %}{{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}{%- endif %}
{%- for args_name, args_value in tool_call.arguments|items %}
{{- '<parameter=' + args_name + '>\n' }}
{%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
{{- args_value + '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.previtem and loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}"""
# the demo's (demo/model/chat_template.jinja): no thinking, it answers right after `<|im_start|>assistant\n`;
# a chat without tools or a system turn renders as the first demo's template did
TEMPLATE = _MESSAGES + r"""
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""
# Qwen3.5's own generation prompt: an open <think> block, or an empty one with enable_thinking=false
# (tests/test_serve_parsing.py renders the server's reasoning and forced-call prompts with it)
QWEN35_TEMPLATE = _MESSAGES + r"""
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}"""


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = {t["function"]["name"]: t for t in (
    _fn("get_weather", "Current weather for a city", {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _fn("get_time", "Local time in a city", {"city": {"type": "string"}}, ["city"]),
    _fn("calculate", "Evaluate an arithmetic expression", {"expression": {"type": "string"}}, ["expression"]),
    _fn("convert_currency", "Convert an amount of money", {
        "amount": {"type": "number"}, "from_currency": {"type": "string"}, "to_currency": {"type": "string"}},
        ["amount", "from_currency", "to_currency"]),
    _fn("set_timer", "Start a countdown timer", {"minutes": {"type": "integer"}}, ["minutes"]),
    _fn("python_help", "Look up a topic in Python's help pages", {"topic": {"type": "string"}}, ["topic"]),
)}

CITIES = ("Oslo", "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Lima", "Cairo", "Delhi", "Sydney", "Toronto",
          "Chicago", "Boston", "Dublin", "Vienna", "Prague", "Lisbon", "Seoul", "Bangkok", "Nairobi", "Denver",
          "Warsaw", "Athens", "Helsinki", "Zurich", "Montreal", "Manila", "Jakarta", "New York", "Mexico City",
          "Cape Town", "San Francisco", "Buenos Aires", "Hong Kong", "Los Angeles", "Tel Aviv")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "NOK", "SEK", "CAD", "AUD", "INR")
HELP_TOPICS = ("for", "while", "try", "with", "class", "lambda", "assert", "pass", "del", "return", "yield",
               "raise", "break", "continue", "import", "global", "nonlocal", "if")
SKIES = ("sunny", "cloudy", "raining", "snowing", "windy", "foggy", "clear")

# request phrasings per tool; {city}, {unit}, {a} {op} {b}, {amount} {src} {dst}, {minutes}, {topic}
PHRASINGS = {
    "get_weather": ("What's the weather in {city}?", "How is the weather in {city} today?",
                    "Weather in {city}, please.", "Is it cold in {city} right now?",
                    "Tell me the weather for {city}.", "What is the weather like in {city}?"),
    "get_time": ("What time is it in {city}?", "What's the local time in {city}?", "Time in {city}?",
                 "Tell me the current time in {city}.", "Which time is it now in {city}?",
                 "What is the time in {city} right now?"),
    "calculate": ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b}, please.",
                  "How much is {a} {op} {b}?", "Work out {a} {op} {b}.", "What do I get for {a} {op} {b}?"),
    "convert_currency": ("How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.",
                         "What are {amount} {src} worth in {dst}?", "Change {amount} {src} into {dst}, please.",
                         "{amount} {src} to {dst}?", "How many {dst} do I get for {amount} {src}?"),
    "set_timer": ("Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.",
                  "Remind me in {minutes} minutes.", "Timer for {minutes} minutes, please.",
                  "Count down {minutes} minutes.", "Can you set a {minutes}-minute timer?"),
    "python_help": ('Look up the "{topic}" statement in the Python help.', 'Open the help page for "{topic}".',
                    'Find the Python docs for "{topic}".', 'Show me help("{topic}").',
                    'Search the Python help for "{topic}".', 'Get the help text about "{topic}".'),
}
HELD_PHRASINGS = {name: set(p[-2:]) for name, p in PHRASINGS.items()}  # the last two of each: never trained
OPS = ("+", "-", "*", "/")

QUESTIONS = ("Tell me about {}.", "What is {}?", "Explain {}.")
SMALL_TALK = (
    ("Hello!", "Hello! Ask me about Python: a statement, a type or how some part of the language works."),
    ("Hi", "Hi! Which part of Python would you like to know about?"),
    ("Thanks!", "You are welcome. Ask me about another part of Python if you like."),
    ("Thank you.", "You are welcome."),
    ("Who are you?", "I am a tiny demo model for flashmoe, trained on Python's help pages. I can answer "
                     "questions about Python's statements and types, and call the tools you give me."),
)


def subject(title: str) -> str:
    """'The "for" statement' -> 'the "for" statement'; 'Lambdas' stays."""
    return title[0].lower() + title[1:] if title[:2].istitle() or title.startswith("The ") else title


def opening(text: str, limit: int = 700) -> str:
    """The title and first paragraphs of a topic, cut at a paragraph end near `limit` characters."""
    paras = text.split("\n\n")
    out = paras[0]
    for p in paras[1:]:
        if len(out) + 2 + len(p) > limit and len(out) > 200:
            break
        out += "\n\n" + p
    return out


def title(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str = "", calls: list[tuple[str, dict]] = ()) -> dict:
    m = {"role": "assistant", "content": text}
    if calls:
        m["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    return m


# ---- chats about the help topics -------------------------------------------------------------------

def chats(docs: dict[str, str], rng: random.Random, multi: int) -> list[list[dict]]:
    """Every topic asked once in each QUESTIONS shape (single turns, as the first demo had), plus `multi`
    conversations of 2-3 turns about different topics, with some small talk mixed in."""
    keys = sorted(docs)
    out = [[_user(q.format(subject(title(docs[k])))), _assistant(opening(docs[k]))] for k in keys for q in QUESTIONS]
    held = set(second_turn_pairs(docs))
    for _ in range(multi):
        msgs: list[dict] = []
        if rng.random() < 0.15:
            q, a = rng.choice(SMALL_TALK)
            msgs += [_user(q), _assistant(a)]
        picks = rng.sample(keys, rng.choice((2, 2, 3)))
        if tuple(picks[:2]) in held:
            continue
        for k in picks:
            msgs += [_user(rng.choice(QUESTIONS).format(subject(title(docs[k])))),
                     _assistant(opening(docs[k], 400))]
            if rng.random() < 0.1:
                q, a = rng.choice(SMALL_TALK[2:4])
                msgs += [_user(q), _assistant(a)]
        out.append(msgs)
    return out


def second_turn_pairs(docs: dict[str, str], n: int = 40) -> list[tuple[str, str]]:
    """Held-out (first topic, second topic) pairs: chats() never trains a conversation that opens with one."""
    rng = random.Random(1234)
    keys = sorted(docs)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        p = tuple(rng.sample(keys, 2))
        if p not in pairs:
            pairs.append(p)
    return pairs


def second_turn_chats(docs: dict[str, str]) -> list[tuple[list[dict], str, str]]:
    """(messages up to the second question, expected title, first title) for each held-out pair; the
    first reply is the one the model was trained to give."""
    out = []
    for i, (a, b) in enumerate(second_turn_pairs(docs)):
        qa, qb = QUESTIONS[i % 3], QUESTIONS[(i + 1) % 3]
        msgs = [_user(qa.format(subject(title(docs[a])))), _assistant(opening(docs[a], 400)),
                _user(qb.format(subject(title(docs[b]))))]
        out.append((msgs, title(docs[b]), title(docs[a])))
    return out


# ---- tool calls ---------------------------------------------------------------------------------

def _request(name: str, phrasing: str, rng: random.Random) -> tuple[str, dict, str | None, str | None]:
    """(user text, expected arguments, tool result, reply using it) for one request."""
    if name in ("get_weather", "get_time"):
        city = rng.choice(CITIES)
        if name == "get_time":
            hh, mm = rng.randrange(24), rng.randrange(60)
            return (phrasing.format(city=city), {"city": city}, json.dumps({"city": city, "time": f"{hh:02d}:{mm:02d}"}),
                    f"It is {hh:02d}:{mm:02d} in {city}.")
        args = {"city": city}
        text = phrasing.format(city=city)
        unit = "celsius"
        if rng.random() < 0.3:
            unit = rng.choice(("celsius", "fahrenheit"))
            args["unit"] = unit
            text = text.rstrip("?.!") + f", in {unit}" + text[-1]
        deg, sky = rng.randrange(-10, 35) if unit == "celsius" else rng.randrange(15, 95), rng.choice(SKIES)
        return (text, args, json.dumps({"city": city, "temperature": deg, "unit": unit, "sky": sky}),
                f"It is {deg} degrees {unit} and {sky} in {city}.")
    if name == "calculate":
        a, b, op = rng.randrange(1, 1000), rng.randrange(1, 100), rng.choice(OPS)
        expr = f"{a} {op} {b}"
        value = {"+": a + b, "-": a - b, "*": a * b, "/": round(a / b, 4)}[op]
        return (phrasing.format(a=a, op=op, b=b), {"expression": expr}, json.dumps({"result": value}),
                f"{expr} = {value}.")
    if name == "convert_currency":
        amount = rng.choice((rng.randrange(1, 1000), rng.randrange(1, 100) * 10, round(rng.uniform(1, 500), 2)))
        src, dst = rng.sample(CURRENCIES, 2)
        got = round(amount * rng.uniform(0.1, 3.0), 2)
        return (phrasing.format(amount=amount, src=src, dst=dst), {"amount": amount, "from_currency": src, "to_currency": dst},
                json.dumps({"amount": got, "currency": dst}), f"{amount} {src} is {got} {dst}.")
    if name == "set_timer":
        m = rng.choice((rng.randrange(1, 61), rng.randrange(1, 13) * 5))
        return (phrasing.format(minutes=m), {"minutes": m}, json.dumps({"status": "started", "minutes": m}),
                f"Your timer for {m} minutes is running.")
    topic = rng.choice(HELP_TOPICS)
    return phrasing.format(topic=topic), {"topic": topic}, None, None


def _offered(name: str, rng: random.Random) -> list[dict]:
    others = rng.sample([n for n in TOOLS if n != name], rng.choice((0, 1, 1, 2)))
    names = others + [name]
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


def tool_chats(n: int, rng: random.Random, docs: dict[str, str]) -> list[tuple[list[dict], list[dict]]]:
    """(messages, tools) training conversations: calls, results and replies, and unanswerable-by-tool chats."""
    out = []
    names = sorted(TOOLS)
    for _ in range(n):
        if rng.random() < 0.12:  # a Python question while tools that do not fit are offered
            k = rng.choice(sorted(docs))
            tools = [TOOLS[t] for t in rng.sample([t for t in names if t != "python_help"], rng.choice((1, 2)))]
            out.append(([_user(rng.choice(QUESTIONS).format(subject(title(docs[k])))),
                         _assistant(opening(docs[k], 400))], tools))
            continue
        name = rng.choice(names)
        phr = rng.choice([p for p in PHRASINGS[name] if p not in HELD_PHRASINGS[name]])
        text, args, result, reply = _request(name, phr, rng)
        msgs = [_user(text), _assistant(calls=[(name, args)])]
        if result is not None and rng.random() < 0.5:
            msgs += [{"role": "tool", "content": result}, _assistant(reply)]
            if rng.random() < 0.3:  # a second request in the same conversation
                name2 = rng.choice(names)
                phr2 = rng.choice([p for p in PHRASINGS[name2] if p not in HELD_PHRASINGS[name2]])
                text2, args2, _, _ = _request(name2, phr2, rng)
                msgs += [_user(text2), _assistant(calls=[(name2, args2)])]
                tools = _offered(name, rng)
                if TOOLS[name2] not in tools:
                    tools.append(TOOLS[name2])
                out.append((msgs, tools))
                continue
        out.append((msgs, _offered(name, rng)))
    return out


def tool_requests(n: int = 50, seed: int = 4321) -> list[tuple[list[dict], list[dict], str, dict]]:
    """Held-out requests: (messages, tools, expected function, expected arguments), phrased only in the
    untrained HELD_PHRASINGS, the tools offered drawn as in training."""
    rng = random.Random(seed)
    names = sorted(TOOLS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        phr = rng.choice(sorted(HELD_PHRASINGS[name]))
        text, args, _, _ = _request(name, phr, rng)
        out.append(([_user(text)], _offered(name, rng), name, args))
    return out
