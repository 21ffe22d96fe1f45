"""Grammar-constrained decoding with xgrammar: JSON (schema or any object), regex, EBNF, choice, structural tags.

One ``TokenizerInfo`` (with the model's real vocabulary size, which can exceed the tokenizer's) and one
caching ``CompilePool`` per engine: grammars compile in worker processes, bounded in CPU time and
memory, before a request joins the batch, so a slow schema delays only its own request. JSON Schemas
are checked first (``schema_check``: size limits, enum values their type forbids). Each step fills one
bitmask row per constrained request; the sampler applies it (forbidden tokens -> -inf); accepted
tokens advance the request's ``GrammarMatcher`` (kept able to roll back MAX_SPECULATIVE_TOKENS, for speculative decoding:
draft positions are masked by advancing the matcher over the drafts and rolling it back).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr

from engine.config import MAX_SPECULATIVE_TOKENS
from engine.errors import InvalidRequestError
from engine.grammar_worker import CompileError, CompileJob, CompileLimits, CompilePool
from engine.schema_check import SchemaLimits, checked_schema, unenforced_keywords


JUMP_CONTEXT_TOKENS = 4
MAX_FORCED_CHARS_PER_TOKEN = 64  # forced text is cut to this many characters per token it may become
MAX_SOURCE_BYTES = 256 * 1024  # a regex, EBNF grammar or structural tag (schemas: SchemaLimits.max_bytes)
SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # the UTF-8 form of U+D800..U+DFFF, which UTF-8 forbids


@dataclass
class StructuredOutputParams:
    """Exactly one constraint: json_schema, json_object, regex, grammar (EBNF), choice or structural_tag."""

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    structural_tag: Any = None  # an xgrammar StructuralTag (or its dict/JSON form), e.g. for tool calls
    compiled: xgr.CompiledGrammar | None = field(default=None, repr=False, compare=False)  # set by compile()
    job: CompileJob | None = field(default=None, repr=False, compare=False)  # set by StructuredOutputs.job()
    best_effort: bool = False  # a JSON Schema's keywords the grammar cannot enforce are allowed (strict: false)
    unenforced: list[str] = field(default_factory=list, compare=False)  # those keywords, by JSON pointer

    def __post_init__(self) -> None:
        chosen = [name for name in ("json_schema", "regex", "grammar", "choice", "structural_tag")
                  if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(chosen) != 1:
            raise InvalidRequestError("structured_output", f"structured_output: set exactly one of json_schema, json_object, regex, grammar, "
                             f"choice, structural_tag (got {chosen or 'none'})")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequestError("choice", "choice: must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        for name in ("json_schema", "regex", "grammar", "choice", "structural_tag"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int], num_workers: int = 1,
                 limits: CompileLimits = CompileLimits()):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        self.vocab_size = vocab_size
        # xgrammar's schema grammars admit raw control characters inside strings (xgrammar issue #286),
        # which strict JSON parsers reject; with fixed separators no JSON token needs one, so JSON
        # requests also get every token containing a byte below 0x20 masked out.
        self.token_bytes: list[bytes] = info.decoded_vocab  # each token's raw bytes (a byte token's: a partial character)
        no_control = torch.tensor([all(b >= 0x20 for b in token) for token in self.token_bytes])
        # xgrammar admits UTF-16 surrogates encoded as UTF-8 (ED A0..BF ..), which are not UTF-8:
        # decoded they become U+FFFD, breaking the text and a string's maxLength. Every constrained
        # row loses the tokens that hold one, and, right after a token that ends in the lead byte ED,
        # the tokens that start with A0..BF.
        no_surrogate = torch.tensor([SURROGATE.search(t) is None for t in self.token_bytes])
        self.text_allowed = pack_bitmask(no_surrogate)  # every constrained row
        self.json_allowed = pack_bitmask(no_surrogate & no_control)  # JSON rows
        self.ends_with_ed = [t.endswith(b"\xed") for t in self.token_bytes]
        self.no_surrogate_tail = pack_bitmask(torch.tensor([not (t and 0xA0 <= t[0] <= 0xBF) for t in self.token_bytes]))
        not_stop = torch.ones(vocab_size, dtype=torch.bool)
        not_stop[sorted(i for i in info.stop_token_ids if i < vocab_size)] = False
        self.not_stop = pack_bitmask(not_stop)
        self._stop_check_mask = xgr.allocate_token_bitmask(1, vocab_size)  # reused: only the engine thread checks
        self.tokenizer = tokenizer
        self.pool = CompilePool(info, num_workers, limits)

    def job(self, spec: StructuredOutputParams) -> CompileJob:
        """What the pool compiles (and caches by), made once per spec; a JSON Schema is checked first,
        and a source over the size limit refused, both naming the parameter."""
        if spec.job is None:
            spec.job = self._make_job(spec)
        return spec.job

    def _make_job(self, spec: StructuredOutputParams) -> CompileJob:
        if spec.json_schema is not None:
            schema = checked_schema(spec.json_schema, "json_schema", SchemaLimits(), spec.best_effort)
            spec.unenforced = unenforced_keywords(schema) if spec.best_effort else []
            return CompileJob("json_schema", json.dumps(schema))
        if spec.json_object:
            return CompileJob("json_object", "")
        if spec.choice is not None:
            source = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return self._sized(spec, CompileJob("grammar", source))
        if spec.regex is not None:
            return self._sized(spec, CompileJob("regex", spec.regex))
        if spec.grammar is not None:
            return self._sized(spec, CompileJob("grammar", spec.grammar))
        tag = spec.structural_tag
        if isinstance(tag, xgr.StructuralTag):
            tag = tag.model_dump_json()
        return self._sized(spec, CompileJob("structural_tag", tag if isinstance(tag, str) else json.dumps(tag)))

    @staticmethod
    def _sized(spec: StructuredOutputParams, job: CompileJob) -> CompileJob:
        if len(job.source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise InvalidRequestError(spec.kind, f"{spec.kind}: {len(job.source)} characters, over the limit of "
                                                 f"{MAX_SOURCE_BYTES} bytes")
        return job

    def cached(self, spec: StructuredOutputParams) -> bool:
        """True when the spec's grammar needs no compile (attaches it). Blocks briefly (a schema is
        checked to make its cache key): call it off the event loop."""
        if spec.compiled is None:
            spec.compiled = self.pool.cached(self.job(spec))
        return spec.compiled is not None

    def compile(self, spec: StructuredOutputParams) -> xgr.CompiledGrammar:
        """Compile (or fetch from the pool's cache) and attach to the spec; a bad spec is an
        InvalidRequestError naming its parameter. Blocks: call it off the event loop."""
        if spec.compiled is None:
            try:
                spec.compiled = self.pool.compile(self.job(spec))
            except CompileError as exc:
                raise InvalidRequestError(spec.kind, f"{spec.kind}: cannot serve this {spec.kind.replace('_', ' ')}: "
                                                     f"{exc}") from None
        return spec.compiled

    def matcher(self, spec: StructuredOutputParams) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compile(spec), max_rollback_tokens=MAX_SPECULATIVE_TOKENS)

    def only_stop_allowed(self, matcher: xgr.GrammarMatcher) -> bool:
        """True when the grammar is complete and admits nothing but a stop token."""
        if not matcher.is_completed():
            return False
        matcher.fill_next_token_bitmask(self._stop_check_mask, 0)
        return not bool((self._stop_check_mask[0] & self.not_stop).any())

    def jump_forward_tokens(self, matcher: xgr.GrammarMatcher, output_ids: list[int], budget: int) -> list[int]:
        """Tokens for the text the grammar forces next, as the model's own tokenizer would split it.

        xgrammar's own split (longest vocabulary match) can differ from the tokenizer's, which would
        put the model off its usual path; so the forced text is re-encoded after a few tokens of
        context, and only the tokens past that context are used (the last one may still merge with
        what follows, so it is left to sampling). At most ``budget`` tokens (what the request may still
        emit): a grammar can force far more text than that (grammar_check bounds it, not to max_tokens)."""
        forced = matcher.find_jump_forward_string()
        if not forced or budget <= 0:
            return []
        forced = forced[:MAX_FORCED_CHARS_PER_TOKEN * (budget + 1)]
        context = self.tokenizer.decode(output_ids[-JUMP_CONTEXT_TOKENS:])
        base = self.tokenizer.encode(context, add_special_tokens=False)
        ids = self.tokenizer.encode(context + forced, add_special_tokens=False)
        if ids[:len(base)] != base:
            return []
        return ids[len(base):-1][:budget]

    def bitmask(self, reqs: list, drafts: list[list[int]] | None = None) -> tuple[torch.Tensor, list[int]] | None:
        """One bitmask for the batch: rows for the constrained requests (their row indices returned).

        With ``drafts`` (speculative decoding) each request has 1 + len(drafts) rows, row j being its
        mask after its first j drafts: the matcher is advanced over them and rolled back. Rows after a
        draft the grammar rejects stay unconstrained: that draft gets probability 0, so they are never used."""
        drafts = drafts or [[] for _ in reqs]
        counts = [len(d) + 1 for d in drafts]
        mask = xgr.allocate_token_bitmask(sum(counts), self.vocab_size)
        rows: list[int] = []
        row = 0
        for req, d, count in zip(reqs, drafts, counts):
            if req.matcher is not None:
                advanced = 0
                for j in range(count):
                    req.matcher.fill_next_token_bitmask(mask, row + j)
                    is_json = req.params.structured_output.kind in ("json_schema", "json_object")
                    mask[row + j] &= self.json_allowed if is_json else self.text_allowed
                    previous = d[j - 1] if j else req.token_ids[-1]
                    if previous < len(self.ends_with_ed) and self.ends_with_ed[previous]:
                        mask[row + j] &= self.no_surrogate_tail
                    rows.append(row + j)
                    if j == len(d) or not req.matcher.accept_token(d[j]):
                        break
                    advanced += 1
                    if req.matcher.is_terminated():
                        break
                if advanced:
                    req.matcher.rollback(advanced)
            row += count
        return (mask, rows) if rows else None

def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """bool per token -> xgrammar's int32 bitmask row (bit j of word i is token 32 * i + j)."""
    words = -(-len(allowed) // 32)
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:len(allowed)] = allowed.long()
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: tuple[torch.Tensor, list[int]] | None) -> None:
    if bitmask is not None:
        mask, rows = bitmask
        xgr.apply_token_bitmask_inplace(logits, mask.to(logits.device), indices=rows)
