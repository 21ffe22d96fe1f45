"""Grammar-constrained decoding with xgrammar: JSON (schema or any object), regex, EBNF, choice, structural tags.

One ``TokenizerInfo`` (with the model's real vocabulary size, which can exceed the tokenizer's) and one
caching ``GrammarCompiler`` per engine. Grammars compile before a request joins the batch (in a worker
thread for the async engine), so a slow schema delays only its own request. Each step fills one
bitmask row per constrained request; the sampler applies it (forbidden tokens -> -inf); accepted
tokens advance the request's ``GrammarMatcher``, which can also roll back (for speculative decoding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr


@dataclass
class StructuredOutputParams:
    """Exactly one constraint: json_schema, json_object, regex, grammar (EBNF), choice or structural_tag."""

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    structural_tag: Any = None  # an xgrammar StructuralTag (or its dict/JSON form), e.g. for tool calls

    def __post_init__(self) -> None:
        chosen = [name for name in ("json_schema", "regex", "grammar", "choice", "structural_tag")
                  if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(chosen) != 1:
            raise ValueError(f"structured_output: set exactly one of json_schema, json_object, regex, grammar, "
                             f"choice, structural_tag (got {chosen or 'none'})")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("choice: must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        for name in ("json_schema", "regex", "grammar", "choice", "structural_tag"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)

    def compile(self, spec: StructuredOutputParams) -> xgr.CompiledGrammar:
        """Compile (or fetch from the compiler's cache); a bad spec is a ValueError naming its parameter."""
        try:
            if spec.json_schema is not None:
                schema = spec.json_schema if isinstance(spec.json_schema, str) else json.dumps(spec.json_schema)
                return self.compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
            if spec.json_object:
                return self.compiler.compile_builtin_json_grammar()
            if spec.regex is not None:
                return self.compiler.compile_regex(spec.regex)
            if spec.grammar is not None:
                return self.compiler.compile_grammar(spec.grammar)
            if spec.choice is not None:
                return self.compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
            tag = spec.structural_tag
            return self.compiler.compile_structural_tag(tag if isinstance(tag, (str, xgr.StructuralTag)) else json.dumps(tag))
        except (RuntimeError, ValueError, TypeError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as exc:
            raise ValueError(f"{spec.kind}: invalid {spec.kind.replace('_', ' ')}: {exc}") from exc

    def matcher(self, spec: StructuredOutputParams) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compile(spec), max_rollback_tokens=16)

    def only_stop_allowed(self, matcher: xgr.GrammarMatcher) -> bool:
        """True when the grammar is complete and admits nothing but a stop token."""
        if not matcher.is_completed():
            return False
        mask = xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(mask, 0)
        allowed = torch.nonzero(unpack_bitmask(mask[0], self.vocab_size)).flatten().tolist()
        return set(allowed) <= set(matcher.stop_token_ids)

    def bitmask(self, matchers: list[xgr.GrammarMatcher | None]) -> tuple[torch.Tensor, list[int]] | None:
        """One bitmask for the batch: rows for the constrained requests (their row indices returned)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(mask, i)
        return mask, rows


def unpack_bitmask(row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """An int32 bitmask row -> bool per token."""
    bits = (row[:, None] >> torch.arange(32, dtype=torch.int32)[None, :]) & 1
    return bits.flatten()[:vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: tuple[torch.Tensor, list[int]] | None) -> None:
    if bitmask is not None:
        mask, rows = bitmask
        xgr.apply_token_bitmask_inplace(logits, mask.to(logits.device), indices=rows)
