"""Just enough PromQL lexing to check expressions against a real Prometheus.

Prometheus 2.42 has no parse endpoint, so the tests find what they need in the token stream:
- `vector_selectors(expr)`: each `metric{matchers}` (without its range), to ask which ones have
  series when an expression returns nothing;
- `comparisons_as_bool(expr)`: `a > 0.9` becomes `a > bool 0.9`, so an alert's expression returns
  a 0/1 sample per series whether or not its threshold is crossed right now;
- `substitute(expr, values)`: Grafana's template variables, each replaced by the regex of all of
  its values (what "All" selects), and the built-in intervals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<braces>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`|[^}"'`])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-z0-9]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>(),@])
    """,
    re.VERBOSE,
)
COMPARISONS = frozenset({"==", "!=", ">", "<", ">=", "<="})
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _GROUPING | {"bool", "offset", "and", "or", "unless", "atan2", "Inf", "NaN", "inf", "nan"}
# Series Prometheus makes itself, not scraped families.
BUILTIN_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                            "scrape_samples_scraped", "scrape_samples_post_metric_relabeling",
                            "scrape_series_added"})


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


def tokens(expr: str) -> list[Token]:
    found, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot lex PromQL at {expr[position:position + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            found.append(Token(match.lastgroup, match.group(), match.start(), match.end()))
        position = match.end()
    return found


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str  # "" for a bare {matchers}
    matchers: str  # "{...}" as written, or ""

    def __str__(self) -> str:
        return f"{self.metric}{self.matchers}"


def vector_selectors(expr: str) -> list[Selector]:
    """Every vector selector in `expr`, in order, duplicates removed."""
    found: list[Selector] = []
    toks = tokens(expr)
    i = 0
    while i < len(toks):
        tok = toks[i]
        after = toks[i + 1] if i + 1 < len(toks) else None
        if tok.kind == "ident" and tok.text in _GROUPING and after is not None and after.text == "(":
            i = _after_parens(toks, i + 1)  # a label list, not selectors
            continue
        # A function or aggregation: followed by its arguments or by its `by (...)` / `without (...)`.
        called = after is not None and after.text in ("(", "by", "without")
        if tok.kind == "ident" and tok.text not in _KEYWORDS and not called:
            matchers = after.text if after is not None and after.kind == "braces" else ""
            _add(found, Selector(tok.text, matchers))
            i += 2 if matchers else 1
            continue
        if tok.kind == "braces":
            _add(found, Selector("", tok.text))
        i += 1
    return found


def metric_names(expr: str) -> set[str]:
    return {s.metric for s in vector_selectors(expr) if s.metric}


def comparisons_as_bool(expr: str) -> str:
    """`expr` with `bool` after each comparison operator that lacks it."""
    toks = tokens(expr)
    pieces, last = [], 0
    for i, tok in enumerate(toks):
        if tok.kind == "op" and tok.text in COMPARISONS:
            following = toks[i + 1] if i + 1 < len(toks) else None
            if following is None or following.text != "bool":
                pieces += [expr[last:tok.end], " bool"]
                last = tok.end
    return "".join(pieces) + expr[last:]


def _after_parens(toks: list[Token], open_index: int) -> int:
    depth = 0
    for j in range(open_index, len(toks)):
        depth += {"(": 1, ")": -1}.get(toks[j].text, 0)
        if depth == 0:
            return j + 1
    return len(toks)


def _add(found: list[Selector], selector: Selector) -> None:
    if selector not in found:
        found.append(selector)


# Grafana's built-in variables, as the tests' 1s scrape interval would make them (or longer).
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def variable_names(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(expr)}


def substitute(expr: str, values: dict[str, list[str]]) -> str:
    """Each variable replaced by `(v1|v2|...)`, its values regex-escaped as Grafana escapes them."""
    def replace(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTIN_VARIABLES:
            return BUILTIN_VARIABLES[name]
        if name not in values:
            raise KeyError(f"variable ${name} has no values (used in {expr!r})")
        return "(" + "|".join(_regex_escape(v) for v in values[name]) + ")"

    return _VARIABLE.sub(replace, expr)


def _regex_escape(value: str) -> str:
    # Inside a PromQL double-quoted string a regex backslash is written twice.
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value)


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<match>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.DOTALL)


def parse_label_values(query: str) -> tuple[str | None, str]:
    """`label_values(selector, label)` -> (selector, label); `label_values(label)` -> (None, label)."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"not a label_values(...) query: {query!r}")
    return match.group("match"), match.group("label")
