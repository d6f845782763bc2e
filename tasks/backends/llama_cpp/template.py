"""An Ollama `TEMPLATE` (a Go template) from a tokenizer's Jinja chat template, proven equal.

Jinja cannot be translated to Go templates in general, but most chat templates wrap each message
in a fixed prefix and suffix per role and end with a fixed generation prompt. `derive` finds
those pieces by rendering the Jinja template around sentinel contents, writes the Go template
from them, and then renders a set of conversations both ways (`render` follows the Go template's
meaning for exactly the constructs written here): any difference, and the template is reported as
not derivable, with the first conversation that differs, instead of being written wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SENTINEL = "\x00{}\x00"
CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}],
)  # fmt: skip


@dataclass(frozen=True)
class Pieces:
    head: str  # before the first message (e.g. a BOS the template writes itself)
    wrap: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    generation: str  # after the last message when it is not the assistant's


@dataclass(frozen=True)
class Derived:
    template: str | None  # the Go template; None when the chat template is not of this shape
    problem: str | None  # why not, naming the conversation that differs
    pieces: Pieces | None = None


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split(text: str, contents: list[str]) -> list[str]:
    """`text` cut around each content, in order: len(contents) + 1 pieces."""
    pieces, rest = [], text
    for content in contents:
        before, found, rest = rest.partition(content)
        if not found:
            raise ValueError(f"content {content!r} missing")
        pieces.append(before)
    return [*pieces, rest]


def _pieces(tokenizer) -> Pieces:
    s, u, a = (SENTINEL.format(r) for r in ROLES)
    # [user] gives head + user prefix and the user suffix; [user, assistant] adds the assistant's
    # pieces; [system, user] gives the system prefix and suffix (the user prefix is known).
    user_head, user_suffix = _split(_render(tokenizer, [{"role": "user", "content": u}], False), [u])
    ua = _split(
        _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}], False), [u, a]
    )
    su = _split(_render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], False), [s, u])
    generation = _render(tokenizer, [{"role": "user", "content": u}], True)[
        len(user_head) + len(u) + len(user_suffix) :
    ]
    if not ua[1].startswith(user_suffix):
        raise ValueError("the user suffix depends on what follows it")
    assistant = (ua[1][len(user_suffix) :], ua[2])
    # the system message comes first: head + system prefix is its first piece; the user prefix
    # after it is the user prefix without the head (the shortest head that fits; the renderings
    # of every conversation are compared afterwards)
    for cut in range(len(user_head) + 1):
        head, user_prefix = user_head[:cut], user_head[cut:]
        if su[0].startswith(head) and su[1].endswith(user_prefix):
            system = (su[0][len(head) :], su[1][: len(su[1]) - len(user_prefix)])
            return Pieces(head, {"system": system, "user": (user_prefix, user_suffix), "assistant": assistant},
                          generation)  # fmt: skip
    raise ValueError("no common head")


def _literal(text: str) -> str:
    """Text inside the Go template: braces would start actions, so they become quoted strings."""
    if "{{" in text or "}}" in text:
        return "".join(f"{{{{ {_go_string(c)} }}}}" if c in "{}" else c for c in text)
    return text


def _go_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def go_template(p: Pieces) -> str:
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_literal(pre)}{{{{ .Content }}}}{_literal(post)}'
        for i, (role, (pre, post)) in enumerate(p.wrap.items())
    )
    last = (
        '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}' + _literal(p.generation) + "{{ end }}"
    )
    return f"{_literal(p.head)}{{{{ range $i, $_ := .Messages }}}}{branches}{{{{ end }}}}{last}{{{{ end }}}}"


def render(p: Pieces, messages: list[dict]) -> str:
    """What Ollama renders from `go_template(p)` for `messages` (the last one's turn is next)."""
    out = [p.head]
    for i, m in enumerate(messages):
        pre, post = p.wrap[m["role"]]
        out.append(pre + m["content"] + post)
        if i == len(messages) - 1 and m["role"] != "assistant":
            out.append(p.generation)
    return "".join(out)


def derive(tokenizer) -> Derived:
    if not getattr(tokenizer, "chat_template", None):
        return Derived(None, "the tokenizer has no chat template")
    try:
        pieces = _pieces(tokenizer)
    except Exception as exc:  # a template that refuses a role, or is not per-message
        return Derived(None, f"the chat template is not a fixed prefix/suffix per role ({exc})")
    for messages in CONVERSATIONS:
        expected = _render(tokenizer, messages, messages[-1]["role"] != "assistant")
        if render(pieces, messages) != expected:
            roles = ", ".join(m["role"] for m in messages)
            return Derived(None, f"the derived template renders a conversation ({roles}) differently", pieces)
    return Derived(go_template(pieces), None, pieces)
