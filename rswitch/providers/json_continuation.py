"""A grammar (llama.cpp's GBNF) for the rest of a JSON answer that another model began.

A JSON-mode answer cut mid-stream is continued from its partial text (a prefill). The grammar
llama.cpp uses for JSON mode starts a value from nothing, so it cannot be used for the rest:
it would open a second object. Instead the partial text is read once, as a JSON parser would
read it (which containers are open, and where in a key, a string, a number or a literal it
stopped), and the grammar written for exactly what may follow: the rest of the token it stopped
in, then each open container's remaining members and its closing bracket, innermost first.
Partial text plus anything the grammar accepts is one JSON value (an object, when `root` is
"object"), so the continued answer parses.

Partial text that no JSON value begins with (prose before the brace, a missing colon) gets no
grammar (None): nothing written after it could make it JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

# The value rules, after llama.cpp's own JSON grammar (llama_cpp.llama_grammar.JSON_GBNF): its
# whitespace, and bounded digits (20: any float Python or a model writes) so a number cannot run
# on. Within a number already begun the bound is counted from the cut, a little looser.
RULES = r"""
value ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( member objtail | "}" )
member ::= string ws ":" ws value
objtail ::= ( ws "," ws member )* ws "}"
array ::= "[" ws ( value arrtail | "]" )
arrtail ::= ( ws "," ws value )* ws "]"
string ::= "\"" strrest
strrest ::= char* "\""
char ::= [^"\\\x00-\x1F] | "\\" esc
esc ::= ["\\/bfnrt] | "u" hex hex hex hex
hex ::= [0-9a-fA-F]
number ::= "-"? int frac? exp?
int ::= "0" | [1-9] [0-9]{0,19}
frac ::= "." [0-9]{1,20}
exp ::= [eE] [-+]? [0-9]{1,3}
ws ::= | " " | "\n" [ \t]{0,20}
"""

WHITESPACE = " \t\n\r"
DIGITS = "0123456789"
HEX = DIGITS + "abcdefABCDEF"
LITERALS = {"t": "true", "f": "false", "n": "null"}

# what may follow a number cut in each of its states, and whether it may end there
NUMBER_REST = {
    "minus": "int frac? exp?",
    "zero": "frac? exp?",
    "int": "[0-9]{0,19} frac? exp?",
    "dot": "[0-9]{1,20} exp?",
    "frac": "[0-9]{0,20} exp?",
    "e": "[-+]? [0-9]{1,3}",
    "esign": "[0-9]{1,3}",
    "exp": "[0-9]{0,3}",
}
NUMBER_ENDS = {"zero", "int", "frac", "exp"}

# what may follow a container (or the top level) in each state, once the token it was in ends
FRAME_REST = {
    ("top", "value"): "ws {root} ws",
    ("top", "done"): "ws",
    ("obj", "key_or_close"): 'ws ( member objtail | "}" )',
    ("obj", "key"): "ws member objtail",
    ("obj", "colon"): 'ws ":" ws value objtail',
    ("obj", "value"): "ws value objtail",
    ("obj", "next"): "objtail",
    ("arr", "value_or_close"): 'ws ( value arrtail | "]" )',
    ("arr", "value"): "ws value arrtail",
    ("arr", "next"): "arrtail",
}


def after_value(kind: str) -> str:
    """The state of a frame of `kind` once the value in it has ended."""
    return "done" if kind == "top" else "next"


@dataclass
class Frame:
    kind: str  # "top", "obj" or "arr"
    state: str  # a FRAME_REST state


class Reader:
    """Reads partial JSON a character at a time; `ok` turns False at the first character no
    JSON value could have there."""

    def __init__(self, root: str) -> None:
        self.root = root  # "object" or "value"
        self.frames = [Frame("top", "value")]
        self.token: str | None = None  # "key", "string", "number", "literal", or None between tokens
        self.escape = ""  # in a string: "", "\\" (after a backslash) or "u0".."u3" (hex digits read)
        self.number = ""  # in a number: its NUMBER_REST state
        self.literal = ""  # in a literal: the letters still to come
        self.ok = True
        self.indenting = False  # the text ends in whitespace between tokens: more may follow

    def feed(self, text: str) -> Reader:
        for c in text:
            if not self.ok:
                break
            self.ok = self._char(c)
        self.indenting = bool(text) and text[-1] in WHITESPACE and self.token is None
        return self

    def _char(self, c: str) -> bool:
        if self.token in ("key", "string"):
            return self._string(c)
        if self.token == "number":
            if self._number(c):
                return True
            if self.number not in NUMBER_ENDS:
                return False
            self.token = None
            self._value_done()  # the character after a number is read as the next token
        elif self.token == "literal":
            if c != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self.token = None
                self._value_done()
            return True
        return self._between(c)

    def _string(self, c: str) -> bool:
        if self.escape == "\\":
            if c == "u":
                self.escape = "u0"
            elif c in '"\\/bfnrt':
                self.escape = ""
            else:
                return False
        elif self.escape:  # "uN"
            if c not in HEX:
                return False
            read = int(self.escape[1]) + 1
            self.escape = "" if read == 4 else f"u{read}"
        elif c == "\\":
            self.escape = "\\"
        elif c == '"':
            if self.token == "key":
                self.frames[-1].state = "colon"
            else:
                self._value_done()
            self.token = None
        elif ord(c) < 0x20:  # JSON wants these escaped
            return False
        return True

    def _number(self, c: str) -> bool:
        """Moves the number on by `c`; False when `c` cannot continue it."""
        state, digit = self.number, c in DIGITS
        if state == "minus" and digit:
            self.number = "zero" if c == "0" else "int"
        elif state in ("int", "frac", "exp", "esign") and digit:
            self.number = {"int": "int", "frac": "frac", "exp": "exp", "esign": "exp"}[state]
        elif state == "dot" and digit:
            self.number = "frac"
        elif state == "e" and (digit or c in "+-"):
            self.number = "exp" if digit else "esign"
        elif state in ("zero", "int") and c == ".":
            self.number = "dot"
        elif state in ("zero", "int", "frac") and c in "eE":
            self.number = "e"
        else:
            return False
        return True

    def _between(self, c: str) -> bool:
        if c in WHITESPACE:
            return True
        frame = self.frames[-1]
        match frame.kind, frame.state, c:
            case "obj", "key_or_close" | "key", '"':
                self.token, self.escape = "key", ""
            case ("obj", "key_or_close" | "next", "}") | ("arr", "value_or_close" | "next", "]"):
                self.frames.pop()
                self._value_done()
            case "obj", "colon", ":":
                frame.state = "value"
            case "obj" | "arr", "next", ",":
                frame.state = "key" if frame.kind == "obj" else "value"
            case "top", "value", _ if self.root == "object" and c != "{":
                return False
            case ("top" | "obj" | "arr", "value", _) | ("arr", "value_or_close", _):
                return self._value_start(c)
            case _:
                return False
        return True

    def _value_start(self, c: str) -> bool:
        if c == "{":
            self.frames.append(Frame("obj", "key_or_close"))
        elif c == "[":
            self.frames.append(Frame("arr", "value_or_close"))
        elif c == '"':
            self.token, self.escape = "string", ""
        elif c == "-" or c in DIGITS:
            self.token, self.number = "number", "minus" if c == "-" else "zero" if c == "0" else "int"
        elif c in LITERALS:
            self.token, self.literal = "literal", LITERALS[c][1:]
        else:
            return False
        return True

    def _value_done(self) -> None:
        self.frames[-1].state = after_value(self.frames[-1].kind)

    def rest(self) -> str:
        """The grammar's root: what may follow the text read so far."""
        pieces = ["[ \\t]{0,20}"] if self.indenting else []
        if self.token in ("key", "string"):
            if self.escape == "\\":
                pieces.append("esc")
            elif self.escape:
                pieces.append(" ".join(["hex"] * (4 - int(self.escape[1]))))
            pieces.append("strrest")
        elif self.token == "number":
            pieces.append(NUMBER_REST[self.number])
        elif self.token == "literal":
            pieces.append(f'"{self.literal}"')
        inner = self.frames[-1]
        state = inner.state  # once the token the text stopped in has ended:
        if self.token == "key":
            state = "colon"
        elif self.token is not None:
            state = after_value(inner.kind)
        pieces.append(FRAME_REST[inner.kind, state].replace("{root}", self.root))
        for frame in reversed(self.frames[:-1]):  # each waits for the value inside it to end
            pieces.append(FRAME_REST[frame.kind, after_value(frame.kind)])
        return " ".join(pieces)


def continuation_grammar(partial: str, root: str = "object") -> str | None:
    """GBNF whose every match completes `partial` as one JSON value (`root`: "object" as JSON
    mode asks, or "value"); None when no JSON value begins with `partial`."""
    if root not in ("object", "value"):
        raise ValueError(f"root: 'object' or 'value', not {root!r}")
    reader = Reader(root).feed(partial)
    if not reader.ok:
        return None
    return f"root ::= {reader.rest()}\n{RULES}"
