"""The multi-turn research agent loop (second half of rollout.py; drafted here while the engine is written).

What it does: runs many trajectories at once on the slot engine above. Every row decodes a turn; a row whose turn
ends in a tool call is *parked* and its call goes to a thread pool (the browser session does the web work), while
the other rows keep decoding. When the observation arrives it is tokenised, wrapped in the chat template's
tool/user turn plus the next assistant header, and appended to that row as forced tokens; the row resumes.
A finished trajectory releases its slot and the next queued question (a GRPO group of G rows, submitted with n=G
so its prompt is prefilled once) takes it. When every row is parked the loop blocks on the futures: no busy-wait.

Token exactness: `Trajectory.tokens` is exactly the engine's cache content (prompt, then for each turn the tokens
the engine sampled, then the forced observation tokens). `loss_mask` is 1 exactly on sampled tokens, and
`logprobs` are the engine's sampling log-probs there. Earlier turns are never re-rendered or re-tokenised; a
turn's text is decoded from its own tokens only to parse it. Observations are never parsed, so tag strings inside
web text cannot end a trajectory or fake an answer.

Prompt: a system prompt written from the reference's semantics (Deep AI Research Assistant, today's date, two
tools with JSON schemas, think then either answer or call one tool, short answers, yes/no questions answered yes
or no). Tools are described in the system text itself, never through a template's `tools=` argument, so the same
prompt works with templates that have no tool support (SmolLM2's ChatML) and with those that have it (Qwen2.5).

Tool-call protocols (`RolloutConfig.protocol`):
- `dr` (the reference): `<tool_call>{"name": "web_search", "arguments": {"query": ["q1", "q2"]}}</tool_call>`
  and `{"name": "browse_webpage", "arguments": {"url_list": ["https://..."]}}`.
- `tags` (lighter, small models learn it faster): `<search>q1 | q2</search>` and `<browse>url1 | url2</browse>`;
  several queries/urls in ONE tag separated by `|` (a turn ends at the first closing tag, so "one per tag" would
  mean one per call).
Both end a turn at their closing tags (stop strings) or at `</answer>` or eos.

Turn outcomes (decided here; reward.py scores them, the loop never imports it):
- `<answer>..</answer>` -> status "answered" (answer = the first answer's text).
- a well-formed call -> run it; after `max_turns` turns the call is not run and the status is "max_turns".
- a malformed call (bad JSON, unknown tool, missing/empty arguments, unclosed tag) -> `on_bad_call`:
  "end" = status "format_error" (the reference), "error_observation" = a short error message is the observation
  and the row goes on (counted in stats["n_bad_calls"]).
- neither a call nor an answer (eos, or max_new_tokens hit mid-thought) -> "format_error".
- the cache is full mid-turn, or an observation would not fit with `min_turn_tokens` to spare -> "context_limit".
A `<think>` block is not required by the loop; reward.py's format check (policy turns only) judges that.

Not here: the reward, the browser (browse.py; it enforces "only URLs from the last search" and renders
observations), the engine (above). No global state: everything lives in `rollout()`'s locals.
"""

import datetime as _dt
import json
import re
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from rollout import Engine, SamplingParams  # noqa: F401  (Finished is what Engine.step returns)

# ------------------------------------------------------------------------------------------------ records


@dataclass
class Turn:
    """One assistant turn and what followed it."""
    text: str                      # the sampled tokens of this turn, decoded (for reading and parsing only)
    tool: str | None               # "web_search" | "browse_webpage" | None
    args: dict | None              # the parsed arguments, e.g. {"query": [...]}
    observation: str | None        # the text appended after this turn (tool result or error message)
    error: str | None              # why the call was rejected, or why the trajectory ended here
    n_tokens: int                  # sampled tokens in this turn
    gen_s: float                   # wall time from the row (re)starting to this turn finishing
    tool_s: float                  # wall time of the tool call (0 when none ran)


@dataclass
class Trajectory:
    question: str
    gold: list[str]
    group: int                     # index of the question in the input list
    tokens: list[int]              # prompt + every turn + every observation, exactly as in the engine's cache
    loss_mask: list[int]           # 1 exactly on sampled tokens
    logprobs: list[float]          # sampled-token logprobs, 0.0 where loss_mask is 0
    prompt_len: int
    turns: list[Turn]
    answer: str | None
    status: str                    # "answered" | "format_error" | "max_turns" | "context_limit"
    stats: dict


@dataclass
class RolloutConfig:
    protocol: str = "tags"             # "tags" | "dr"
    max_turns: int = 10                # generation turns (reference 10)
    max_new_tokens: int = 512          # per turn (reference 2000)
    max_len: int = 8192                # context budget per row = engine cache length
    temperature: float = 1.0
    top_p: float = 1.0
    n_slots: int = 64                  # rows decoding at once (fewer are allocated when there is less work)
    on_bad_call: str = "error_observation"   # or "end" (reference: a malformed call is a format error)
    date: str | None = None            # today's date in the system prompt; None = the real date
    tool_threads: int = 32             # concurrent tool calls (each blocks on the web)
    min_turn_tokens: int = 64          # an observation must leave this much room for the next turn
    obs_role: str = "auto"             # role of observations: "tool" | "user" | "auto" (tool if the template has one)


# ------------------------------------------------------------------------------------------------ prompt

TOOLS = [
    {"name": "web_search",
     "description": "Search the web. Returns the title, URL and snippet of the top results for each query. "
                    "Give at most 3 queries per call.",
     "parameters": {"type": "object", "required": ["query"], "properties": {
         "query": {"type": "array", "items": {"type": "string"}, "description": "Search queries."}}}},
    {"name": "browse_webpage",
     "description": "Read web pages found by your most recent web_search and return the information in them "
                    "that is relevant to the question. Only URLs from the most recent search can be read.",
     "parameters": {"type": "object", "required": ["url_list"], "properties": {
         "url_list": {"type": "array", "items": {"type": "string"}, "description": "URLs to read."}}}},
]
ARG_KEY = {"web_search": "query", "browse_webpage": "url_list"}

_CALL_FORMAT = {
    "dr": ('<tool_call>{"name": "web_search", "arguments": {"query": ["first query", "second query"]}}</tool_call>\n'
           '<tool_call>{"name": "browse_webpage", "arguments": {"url_list": ["https://..."]}}</tool_call>'),
    "tags": ("<search>first query | second query</search>   (runs web_search; separate queries with |)\n"
             "<browse>https://... | https://...</browse>   (runs browse_webpage; separate URLs with |)"),
}


def system_prompt(protocol: str, date: str | None = None) -> str:
    """The reference system prompt's content in our own words, with the tools rendered as JSON schemas."""
    date = date or _dt.date.today().isoformat()
    tools = "\n".join(json.dumps(t) for t in TOOLS)
    return (
        f"You are a Deep AI Research Assistant. Today is {date}.\n"
        "Answer the user's question accurately. Think step by step, search the web and read web pages until you "
        "are confident of the answer; do not guess when you can look it up.\n\n"
        f"# Tools\nYou can use these tools (JSON schemas):\n{tools}\n\n"
        "# How to reply\n"
        "Every reply starts with your reasoning inside <think> </think>. After it, do exactly one of:\n"
        f"1. call one tool, written as:\n{_CALL_FORMAT[protocol]}\n"
        "2. give the final answer: <answer>your answer</answer>\n"
        "Tool results come back to you inside <tool_response> </tool_response>.\n"
        "Keep the final answer short: a name, date, number or short phrase, not a sentence. "
        "Answer yes/no questions with yes or no."
    )


def render_prompt(tokenizer, question: str, protocol: str, date: str | None = None) -> list[int]:
    """Prompt token ids: system + user message and the assistant header, through the tokenizer's chat template."""
    sys_text = system_prompt(protocol, date)
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": sys_text},
                                              {"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001  templates without a system role raise (jinja TemplateError): merge into user
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{sys_text}\n\nQuestion: {question}"}],
                                             tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class ObsFrame:
    """The forced text around an observation: `before` closes the assistant turn and opens the tool/user turn,
    `after` closes it and opens the next assistant turn. Taken from the chat template once per rollout."""
    before: str
    after: str
    before_ids: list[int]
    after_ids: list[int]


def obs_frame(tokenizer, role: str = "auto") -> ObsFrame:
    mark_a, mark_o = "\x00ASSISTANT\x00", "\x00OBSERVATION\x00"
    template = tokenizer.chat_template or ""
    if role == "auto":
        role = "tool" if re.search(r"""['"]tool['"]""", template) else "user"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark_a},
            {"role": role, "content": mark_o}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tail = text[text.index(mark_a) + len(mark_a):]
    before, after = tail.split(mark_o)
    if "<tool_response>" not in before:  # templates without tool support: wrap it ourselves, like Qwen2.5 does
        before, after = before + "<tool_response>\n", "\n</tool_response>" + after
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return ObsFrame(before, after, enc(before), enc(after))


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """eos plus the end-of-turn tokens chat models emit (Qwen2.5-Instruct stops on either of two)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>") if t in vocab}
    return tuple(sorted(ids))


# ------------------------------------------------------------------------------------------------ parsing


@dataclass
class Action:
    """What a turn asks for: kind is "answer", "call", "bad_call" or "none"."""
    kind: str
    tool: str | None = None
    args: dict | None = None
    answer: str | None = None
    error: str | None = None


STOP_STRINGS = {"dr": ("</tool_call>", "</answer>"), "tags": ("</search>", "</browse>", "</answer>")}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def _check_args(tool: str, value) -> tuple[dict | None, str | None]:
    key = ARG_KEY[tool]
    if isinstance(value, str):  # a lone string where a list is asked for: accept it, it is unambiguous
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None, f"{tool}: '{key}' must be a list of strings"
    value = [v.strip() for v in value if v.strip()]
    if not value:
        return None, f"{tool}: empty '{key}'"
    return {key: value}, None


def parse_turn(text: str, protocol: str) -> Action:
    """Decide what one turn of the policy asks for. Only the policy's own text is ever parsed.

    The engine stops a turn at the first closing tag, so the action is the one whose closing tag the text ends
    with; an answer found earlier in the text (no stop string hit, e.g. eos) still counts."""
    body = text.rstrip()
    call_tags = ("tool_call",) if protocol == "dr" else ("search", "browse")
    for tag in call_tags:
        close = f"</{tag}>"
        if body.endswith(close):
            start = body.rfind(f"<{tag}>")
            if start < 0:
                return Action("bad_call", error=f"{close} without <{tag}>")
            inner = body[start + len(tag) + 2:len(body) - len(close)].strip()
            return _parse_call(tag, inner)
    m = _ANSWER.search(body)
    if m:
        return Action("answer", answer=m.group(1).strip())
    for tag in call_tags:
        if f"<{tag}>" in body:
            return Action("bad_call", error=f"<{tag}> is not closed")
    return Action("none", error="the turn has neither a tool call nor an answer")


def _parse_call(tag: str, inner: str) -> Action:
    if tag == "tool_call":
        try:
            call = json.loads(inner)
        except json.JSONDecodeError as e:
            return Action("bad_call", error=f"tool call is not valid JSON ({e.msg})")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Action("bad_call", error='tool call must be {"name": ..., "arguments": {...}}')
        name, arguments = call["name"], call.get("arguments")
        if name not in ARG_KEY:
            return Action("bad_call", error=f"unknown tool '{name}' (use web_search or browse_webpage)")
        if not isinstance(arguments, dict):
            return Action("bad_call", tool=name, error=f"{name}: 'arguments' must be an object")
        args, err = _check_args(name, arguments.get(ARG_KEY[name]))
    else:
        name = "web_search" if tag == "search" else "browse_webpage"
        args, err = _check_args(name, inner.split("|"))
    return Action("bad_call", tool=name, error=err) if err else Action("call", tool=name, args=args)


def bad_call_message(error: str, protocol: str) -> str:
    """The short observation a malformed call gets under on_bad_call='error_observation'."""
    how = ('<tool_call>{"name": ..., "arguments": {...}}</tool_call>' if protocol == "dr"
           else "<search>query</search> or <browse>url</browse>")
    return f"Error: {error}. Call a tool as {how}, or give the final answer as <answer>...</answer>."


def run_tool(session, tool: str, args: dict) -> tuple[str, float]:
    """Run one call on a browser session; (observation, seconds). Sessions return errors as text and never raise;
    a bug that raises anyway becomes an observation so one row cannot take the rollout down."""
    t0 = time.perf_counter()
    try:
        if tool == "web_search":
            obs = session.web_search(args["query"])
        else:
            obs = session.browse_webpage(args["url_list"])
    except Exception as e:  # noqa: BLE001
        obs = f"Error: {tool} failed ({type(e).__name__}: {e})"
    return obs, time.perf_counter() - t0


def _defang(text: str, specials: list[str]) -> str:
    """Web text that spells a control token (`<|im_end|>`) must not become that token: break it up."""
    for s in specials:
        if s and s in text:
            text = text.replace(s, s[:1] + " " + s[1:])
    return text


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class _Row:
    """Loop-side state of one live trajectory (slot -> _Row)."""
    traj: Trajectory
    session: object
    t_start: float                     # when the trajectory was admitted
    t_turn: float                      # when the current turn started decoding
    n_turns: int = 0
    pending: Turn | None = None        # the turn whose tool call is in flight


def rollout(model, tokenizer, questions: list[str], golds: list[list[str]], browser, cfg: RolloutConfig,
            group_size: int = 1, seed: int = 0, *, engine=None) -> list[Trajectory]:
    """Run the agent on every question `group_size` times; returns trajectories question-major
    (question i's rows are [i*G, (i+1)*G)). `engine` overrides the Engine built here (tests, benchmarks)."""
    if cfg.protocol not in STOP_STRINGS:
        raise ValueError(f"protocol must be 'tags' or 'dr', got {cfg.protocol!r}")
    if cfg.on_bad_call not in ("end", "error_observation"):
        raise ValueError(f"on_bad_call must be 'end' or 'error_observation', got {cfg.on_bad_call!r}")
    if len(golds) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(golds)} gold lists")
    G = group_size
    if engine is None:
        n_slots = min(cfg.n_slots, len(questions) * G)
        if n_slots < G:
            raise ValueError(f"n_slots={cfg.n_slots} cannot hold a group of {G}")
        engine = Engine(model, n_slots=n_slots, max_len=cfg.max_len,
                        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False), seed=seed)
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              stop_token_ids=stop_token_ids(tokenizer), stop_strings=STOP_STRINGS[cfg.protocol])
    frame = obs_frame(tokenizer, cfg.obs_role)
    specials = list(getattr(tokenizer, "all_special_tokens", []))
    out: list[Trajectory | None] = [None] * (len(questions) * G)
    queue = deque(range(len(questions)))
    rows: dict[int, _Row] = {}
    futures: dict[Future, tuple[int, int]] = {}   # tool call in flight -> (slot, last sampled token)

    def finish(slot: int, status: str, answer: str | None = None) -> None:
        row = rows.pop(slot)
        engine.release(slot)
        t = row.traj
        t.status, t.answer = status, answer
        t.stats.update(n_turns=len(t.turns), wall_s=time.perf_counter() - row.t_start,
                       gen_s=sum(x.gen_s for x in t.turns), tool_s=sum(x.tool_s for x in t.turns))

    def resume(slot: int, turn: Turn, observation: str, last_token: int) -> None:
        """Append the forced observation tokens to a parked row, or end it when they would not fit."""
        row = rows[slot]
        turn.observation = observation
        before = frame.before_ids
        if last_token in sampling.stop_token_ids and frame.before.startswith(tokenizer.decode([last_token])):
            # the turn already closed itself with eos/<|im_end|>; do not close it twice
            before = tokenizer.encode(frame.before[len(tokenizer.decode([last_token])):], add_special_tokens=False)
        body = tokenizer.encode(_defang(observation, specials), add_special_tokens=False)
        forced = before + body + frame.after_ids
        t = row.traj
        if len(t.tokens) + len(forced) + cfg.min_turn_tokens > cfg.max_len:
            turn.error = "; ".join(filter(None, [turn.error, "observation does not fit in the context budget"]))
            finish(slot, "context_limit")
            return
        t.tokens += forced
        t.loss_mask += [0] * len(forced)
        t.logprobs += [0.0] * len(forced)
        row.t_turn = time.perf_counter()
        engine.append(slot, forced, sampling)

    def on_finished(fin) -> None:
        row = rows[fin.slot]
        t = row.traj
        t.tokens += fin.tokens
        t.loss_mask += [1] * len(fin.tokens)
        t.logprobs += list(fin.logprobs)
        text = tokenizer.decode(fin.tokens, skip_special_tokens=True)
        act = parse_turn(text, cfg.protocol)
        turn = Turn(text=text, tool=act.tool, args=act.args, observation=None, error=act.error,
                    n_tokens=len(fin.tokens), gen_s=time.perf_counter() - row.t_turn, tool_s=0.0)
        t.turns.append(turn)
        row.n_turns += 1
        if act.kind == "answer":
            return finish(fin.slot, "answered", act.answer)
        if fin.reason == "context":
            turn.error = "context budget exhausted while generating"
            return finish(fin.slot, "context_limit")
        if act.kind == "none":
            if fin.reason == "length":
                turn.error = f"no tool call or answer within max_new_tokens={cfg.max_new_tokens}"
            return finish(fin.slot, "format_error")
        if act.kind == "bad_call":
            t.stats["n_bad_calls"] += 1
            if cfg.on_bad_call == "end":
                return finish(fin.slot, "format_error")
        if row.n_turns >= cfg.max_turns:  # no turn left to read the observation: do not run the call
            return finish(fin.slot, "max_turns")
        if act.kind == "bad_call":
            return resume(fin.slot, turn, bad_call_message(act.error, cfg.protocol), fin.tokens[-1])
        t.stats["n_search" if act.tool == "web_search" else "n_browse"] += 1
        row.pending = turn
        futures[pool.submit(run_tool, row.session, act.tool, act.args)] = (fin.slot, fin.tokens[-1])

    def on_tool_done(fut: Future) -> None:
        slot, last_token = futures.pop(fut)
        row = rows[slot]
        obs, secs = fut.result()
        turn, row.pending = row.pending, None
        turn.tool_s = secs
        resume(slot, turn, obs, last_token)

    def admit() -> None:
        """Queued questions take free slots, a whole group at a time (its prompt is prefilled once)."""
        while queue and engine.n_free >= G:
            qi = queue.popleft()
            prompt = render_prompt(tokenizer, questions[qi], cfg.protocol, cfg.date)
            now = time.perf_counter()
            trajs = [Trajectory(question=questions[qi], gold=list(golds[qi]), group=qi, tokens=list(prompt),
                                loss_mask=[0] * len(prompt), logprobs=[0.0] * len(prompt), prompt_len=len(prompt),
                                turns=[], answer=None, status="", stats=dict(n_search=0, n_browse=0, n_bad_calls=0))
                     for _ in range(G)]
            for g, tr in enumerate(trajs):
                out[qi * G + g] = tr
            if len(prompt) + cfg.min_turn_tokens > cfg.max_len:  # nothing to decode: never occupy a slot
                for tr in trajs:
                    tr.status, tr.stats["n_turns"] = "context_limit", 0
                continue
            slots = engine.submit(prompt, sampling, n=G)
            for slot, tr in zip(slots, trajs):
                rows[slot] = _Row(traj=tr, session=browser.session(questions[qi]), t_start=now, t_turn=now)

    with ThreadPoolExecutor(max_workers=cfg.tool_threads, thread_name_prefix="tool") as pool:
        while queue or rows:
            admit()
            if queue and not rows:
                raise ValueError(f"the engine has {engine.n_free} free slots, a group needs {G}")
            if engine.n_decoding:
                for fin in engine.step():
                    on_finished(fin)
            elif futures:  # every live row waits on the web: block until one call returns
                wait(list(futures), return_when=FIRST_COMPLETED)
            elif rows:
                raise RuntimeError(f"rows {sorted(rows)} are neither decoding nor waiting on a tool")
            for fut in [f for f in futures if f.done()]:
                on_tool_done(fut)
    return out
