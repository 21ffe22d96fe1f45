"""Which grammars can end: shortest-text lengths of an xgrammar grammar's rules.

xgrammar compiles a grammar whose every path runs forever (``root ::= "a" root``, or a JSON Schema
whose required properties recurse) and then builds its forced text (jump-forward) without bound,
until memory runs out. Before compiling, the grammar's normalized EBNF (``str(xgr.Grammar)``) is
read here and each rule's shortest text is found (``shortest_lengths``). A reachable rule with no finite
text, or a shortest text longer than a bound, is refused: forced text is a prefix of the shortest
completion, so a grammar that passes can force at most a bounded amount of text at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INFINITE = float("inf")

TOKEN = re.compile(r'''
    (?P<space>\s+) | (?P<define>::=) | (?P<string>"(?:\\.|[^"\\])*") | (?P<cls>\[(?:\\.|[^\]\\])*\])
  | (?P<repeat>\{\s*\d+\s*,\s*-?\d+\s*\}) | (?P<call>[A-Za-z_]\w*\() | (?P<name>[A-Za-z_]\w*)
  | (?P<lookahead>\(=) | (?P<op>[()|*+?]) | (?P<other>.)''', re.VERBOSE | re.DOTALL)

ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)")


@dataclass
class Node:
    """One expression: kind in seq, alt, text (a fixed length), ref, repeat; built by ``Parser``."""

    kind: str
    children: list[Node]  # (text: the rules a built-in such as TagDispatch uses)
    length: int = 0  # text: its length; repeat: the minimum count
    name: str = ""  # ref: the rule


class Parser:
    """xgrammar's printed EBNF: ``name ::= expr`` per rule; ``"str"``, ``[class]``, names, groups,
    ``|``, ``* + ? {m, n}``, lookaheads ``(= ...)`` (which add no text) and built-ins such as
    ``TagDispatch(...)`` and ``Regex(...)``, taken as able to end at once (they match free text)."""

    def __init__(self, text: str):
        self.tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(text) if m.lastgroup != "space"]
        self.pos = 0

    def rules(self) -> dict[str, Node]:
        rules = {}
        while self.pos < len(self.tokens):
            kind, name = self.tokens[self.pos]
            if kind != "name" or self._peek(1) != ("define", "::="):
                raise ValueError(f"unexpected {name!r} in grammar")
            self.pos += 2
            rules[name] = self._alternatives()
        return rules

    def _peek(self, offset: int = 0) -> tuple[str, str] | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def _alternatives(self) -> Node:
        options = [self._sequence()]
        while self._peek() == ("op", "|"):
            self.pos += 1
            options.append(self._sequence())
        return options[0] if len(options) == 1 else Node("alt", options)

    def _sequence(self) -> Node:
        items = []
        while (token := self._peek()) is not None and token not in (("op", "|"), ("op", ")")):
            if token[0] == "name" and self._peek(1) == ("define", "::="):
                break  # the next rule
            items.append(self._postfix(self._atom()))
        return Node("seq", items)

    def _atom(self) -> Node:
        kind, text = self.tokens[self.pos]
        self.pos += 1
        if kind == "string":
            return Node("text", [], len(ESCAPE.sub("_", text[1:-1])))
        if kind == "cls":
            return Node("text", [], 1)
        if kind == "name":
            return Node("ref", [], name=text)
        if kind in ("lookahead", "call"):  # no text of its own; the rules it names are still used
            return Node("text", self._skip_group(), 0)
        if (kind, text) == ("op", "("):
            inner = self._alternatives()
            self._expect(")")
            return inner
        raise ValueError(f"unexpected {text!r} in grammar")

    def _postfix(self, node: Node) -> Node:
        token = self._peek()
        if token is None or token[0] not in ("op", "repeat") or token[1] in "()|":
            return node
        self.pos += 1
        minimum = {"*": 0, "?": 0, "+": 1}.get(token[1])
        if minimum is None:  # {m, n}
            minimum = int(token[1][1:].split(",")[0])
        return Node("repeat", [node], minimum)

    def _skip_group(self) -> list[Node]:
        """Up to the closing parenthesis; the names inside, as references."""
        depth, names = 1, []
        while depth:
            kind, text = self.tokens[self.pos]
            self.pos += 1
            depth += (kind in ("lookahead", "call") or text == "(") - (text == ")")
            if kind == "name":
                names.append(Node("ref", [], name=text))
        return names

    def _expect(self, text: str) -> None:
        if self._peek() != ("op", text):
            raise ValueError(f"expected {text!r} in grammar")
        self.pos += 1


def shortest_lengths(rules: dict[str, Node]) -> dict[str, float]:
    """Each rule's shortest text length (INFINITE: no finite text). Rules are settled one strongly
    connected group at a time, dependencies first, iterating only within a group (to a fixpoint,
    which takes at most one pass per rule in it): linear for the chains a big schema makes."""
    lengths = dict.fromkeys(rules, INFINITE)

    def measure(node: Node) -> float:
        if node.kind == "text":
            return node.length
        if node.kind == "ref":
            return lengths.get(node.name, 0)  # a rule xgrammar did not print is one of its built-ins
        if node.kind == "seq":
            return sum(measure(child) for child in node.children)
        if node.kind == "alt":
            return min(measure(child) for child in node.children)
        return node.length * measure(node.children[0]) if node.length else 0  # repeat

    for group in strongly_connected(rules):
        for _ in range(len(group) + 1):
            changed = False
            for name in group:
                value = measure(rules[name])
                if value < lengths[name]:
                    lengths[name], changed = value, True
            if not changed:
                break
    return lengths


def references(node: Node) -> set[str]:
    found, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node.kind == "ref":
            found.add(node.name)
        todo.extend(node.children)
    return found


def strongly_connected(rules: dict[str, Node]) -> list[list[str]]:
    """Tarjan's algorithm without recursion (a 200-deep schema makes 200-deep rule chains): the groups
    of mutually recursive rules, each after every group it refers to."""
    edges = {name: [r for r in references(node) if r in rules] for name, node in rules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in rules:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            name, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[name])
                if low[name] == index[name]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == name:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[name] = min(low[name], index[child])
    return groups


def reachable(rules: dict[str, Node], root: str = "root") -> list[str]:
    seen, todo = {root}, [root]
    while todo:
        for name in references(rules[todo.pop()]):
            if name in rules and name not in seen:
                seen.add(name)
                todo.append(name)
    return [name for name in rules if name in seen]


def check_grammar(ebnf: str, max_shortest: int) -> str | None:
    """Why the grammar cannot be served (no finite text, or a shortest text over ``max_shortest``
    characters), naming the rules; None when it can."""
    rules = Parser(ebnf).rules()
    lengths = shortest_lengths(rules)
    used = reachable(rules)
    endless = [name for name in used if lengths[name] == INFINITE]
    if endless:
        return (f"no finite output satisfies it: {_names(endless)} can never end (every alternative "
                f"requires itself again)")
    longest = max(used, key=lambda name: lengths[name])
    if lengths[longest] > max_shortest:
        return (f"its shortest output is {lengths[longest]:.0f} characters ({_names([longest])}), "
                f"over the limit of {max_shortest}")
    return None


def _names(rules: list[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in rules[:3])
    return ("rule " if len(rules) == 1 else "rules ") + shown + (f" and {len(rules) - 3} more" if len(rules) > 3 else "")
