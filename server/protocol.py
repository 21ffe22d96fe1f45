"""Pydantic models of the OpenAI API as kvserve speaks it.

Requests ignore unknown fields (clients send vendor extras; OpenAI's own SDKs add fields over
time) but type-check the ones we know; value ranges are checked once, by ``SamplingParams``, so the
server and the engine never disagree on what is valid. Responses and streaming chunks have exactly
the fields the ``openai`` client parses, plus vLLM's ``stop_reason``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    WithJsonSchema,
    field_serializer,
    model_serializer,
    model_validator,
)

from engine import SamplingParams
from engine.request import MAX_LOGPROBS
from engine.structured import StructuredOutputParams
from server.errors import APIError, ErrorResponse, bad_request, error_responses


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's client sends ``"n": null`` and the like for optional fields: same as not sent."""
        if not isinstance(data, dict):
            return data
        where = unencodable_text(data)
        if where is not None:  # JSON admits "\ud800"; the tokenizer and every encoder after it do not
            raise APIError(400, f"{where or 'body'}: text holds a lone UTF-16 surrogate, which is not valid "
                                "Unicode text", where or None)
        return {k: v for k, v in data.items() if v is not None}


def unencodable_text(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (key or value) in a JSON value that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{path}.{key}" if path else str(key)
        found = unencodable_text(key, inner) if isinstance(key, str) else None
        if found is None:
            found = unencodable_text(item, inner)
        if found is not None:
            return found
    return None


# Documented shapes of the fields validated by hand (structured_output(), ToolRequest), so /openapi.json
# shows what they take while what they accept stays as it was. Booleans are StrictBool everywhere:
# OpenAI refuses "yes" or 1 for a boolean, and pydantic's lax mode would read them as true.
_OBJECT = {"type": "object", "additionalProperties": True}
_JSON_SCHEMA = {"anyOf": [{**_OBJECT, "description": "a JSON Schema"}, {"type": "string", "description": "a JSON Schema as JSON text"}]}
_RESPONSE_FORMAT = {"oneOf": [
    {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
    {"type": "object", "properties": {"type": {"const": "json_object"}}, "required": ["type"]},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["schema"], "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "schema": _OBJECT,
            "strict": {"type": "boolean"}}}}}]}
_STRUCTURED_OUTPUTS = {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                       "description": "exactly one constraint", "properties": {
                           "json": _JSON_SCHEMA, "json_schema": _JSON_SCHEMA, "json_object": {"const": True},
                           "regex": {"type": "string"}, "grammar": {"type": "string", "description": "EBNF"},
                           "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT = {"anyOf": [{"type": "string", "minLength": 1},
                     {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                     _TOKEN_IDS, {"type": "array", "minItems": 1, "items": _TOKEN_IDS}]}
_FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"}
_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": _FUNCTION_NAME, "description": {"type": "string"},
        "parameters": {**_OBJECT, "description": "a JSON Schema of the arguments"}, "strict": {"type": "boolean"}}}}}
_TOOL_CHOICE = {"anyOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": _FUNCTION_NAME}}}}]}



def documented(default: Any = None, **schema: Any) -> Any:
    """A field with JSON Schema keywords (its range, say) in the document only: the values are checked
    where they are used (SamplingParams, the routes), one rule and one message for each."""
    return Field(default, json_schema_extra=schema)


ResponseFormat = Annotated[dict[str, Any], WithJsonSchema(_RESPONSE_FORMAT)]
StructuredOutputs = Annotated[dict[str, Any], WithJsonSchema(_STRUCTURED_OUTPUTS)]
Tools = Annotated[list[dict[str, Any]], WithJsonSchema({"type": "array", "items": _TOOL})]
ToolChoice = Annotated[str | dict[str, Any], WithJsonSchema(_TOOL_CHOICE)]


class StreamOptions(Request):
    include_usage: StrictBool = False


class SamplingRequest(Request):
    """The fields completions and chat share: OpenAI's sampling settings and vLLM's extras."""

    model: str | None = None
    n: int = documented(1, minimum=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = documented(minimum=0)
    top_p: float | None = documented(exclusiveMinimum=0, maximum=1)
    presence_penalty: float | None = documented(minimum=-2, maximum=2)
    frequency_penalty: float | None = documented(minimum=-2, maximum=2)
    logit_bias: dict[str, Annotated[float, Field(json_schema_extra={"minimum": -100, "maximum": 100})]] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = documented(minimum=-1)
    min_p: float | None = documented(minimum=0, maximum=1)
    repetition_penalty: float | None = documented(exclusiveMinimum=0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # Structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs.
    response_format: ResponseFormat | None = None
    guided_json: Annotated[dict[str, Any] | str, WithJsonSchema(_JSON_SCHEMA)] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = Field(None, description="EBNF")
    guided_choice: list[str] | None = documented(minItems=1)
    structured_outputs: StructuredOutputs | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def structured_output(self) -> tuple[StructuredOutputParams | None, str | None]:
        """The constraint asked for, and the request field that asked for it (for error messages)."""
        asked: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            if fmt.get("type") == "json_object":
                asked.append(("response_format", {"json_object": True}))
            elif fmt.get("type") == "json_schema":
                spec = fmt.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, (dict, bool)):
                    raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object", "response_format")
                asked.append(("response_format", {"json_schema": schema, "best_effort": spec.get("strict") is False}))
            else:
                raise APIError(400, f"response_format type must be text, json_object or json_schema, got {fmt.get('type')!r}",
                               "response_format")
        guided = {"json_schema": self.guided_json, "regex": self.guided_regex, "grammar": self.guided_grammar,
                  "choice": self.guided_choice}
        asked += [(f"guided_{'json' if k == 'json_schema' else k}", {k: v}) for k, v in guided.items() if v is not None]
        if self.structured_outputs:
            renamed = {"json": "json_schema"}
            spec = {renamed.get(k, k): v for k, v in self.structured_outputs.items() if v is not None}
            unknown = set(spec) - {"json_schema", "regex", "grammar", "choice", "json_object"}
            if unknown:
                raise APIError(400, f"structured_outputs has unknown keys {sorted(unknown)}", "structured_outputs")
            asked.append(("structured_outputs", spec))
        if not asked:
            return None, None
        if len(asked) > 1:
            raise APIError(400, f"give one structured-output constraint, got {[field for field, _ in asked]}", asked[1][0])
        field, spec = asked[0]
        try:
            return StructuredOutputParams(**spec), field
        except (ValueError, TypeError) as exc:
            raise APIError(400, f"{field}: {exc}", field) from None

    def sampling_params(self, defaults: dict[str, Any], renames: dict[str, str] | None = None,
                        **fields: Any) -> SamplingParams:
        """SamplingParams from the shared fields plus the API-specific ``fields``; ``None`` means
        "not sent", so ``defaults`` (the model's generation config) or else SamplingParams' own
        apply. A bad value is a 400 naming the field sent."""
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
        given = dict(stop=self.stop, temperature=self.temperature, top_p=self.top_p,
                     presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                     logit_bias=bias, top_k=self.top_k, min_p=self.min_p,
                     repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
                     stop_token_ids=self.stop_token_ids, skip_special_tokens=self.skip_special_tokens,
                     include_stop_str_in_output=self.include_stop_str_in_output,
                     structured_output=self.structured_output()[0])
        given.update(fields)
        try:
            return SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}})
        except ValueError as exc:
            raise bad_request(exc, renames) from None


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 8},
        {"prompt": ["Hello", "Goodbye"], "max_tokens": 4, "n": 2, "logprobs": 2, "echo": True, "seed": 1},
        {"prompt": "The answer is", "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}},
        {"prompt": "A JSON object:", "max_tokens": 4, "response_format": {"type": "json_object"}}]})

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WithJsonSchema(_PROMPT)]
    max_tokens: int | None = documented(16, minimum=1)
    echo: StrictBool = False
    logprobs: int | None = documented(minimum=0, maximum=MAX_LOGPROBS)
    best_of: int | None = documented(minimum=1)
    suffix: str | None = None


class ContentPart(Request):
    type: str
    text: str | None = None


class FunctionCall(Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    model_config = ConfigDict(extra="allow")  # name and the like reach the template as sent

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 8},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 8,
         "stream": True, "logprobs": True, "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 16, "tool_choice": "auto",
         "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]},
        {"messages": [{"role": "user", "content": "A person"}], "max_tokens": 16, "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "schema": {
                "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}}]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = documented(minimum=1)
    max_completion_tokens: int | None = documented(minimum=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = documented(minimum=0, maximum=MAX_LOGPROBS)
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    add_generation_prompt: StrictBool = True


class TokenizeRequest(Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: Tools | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0}})


class LoadLoRAAdapterRequest(Request):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(Request):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM accepts it; the name alone decides here


# --- responses ------------------------------------------------------------------------------
class OmitsNone(BaseModel):
    """The fields named in ``omitted_when_none`` are left out of the body while None: OpenAI's schema
    has them optional but not nullable (usage on a stream's chunks, tool_calls on a message)."""

    omitted_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.omitted_when_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(OmitsNone):
    """A whole completion, or (``usage`` None) one streamed chunk: OpenAI uses the same shape."""

    omitted_when_none = ("usage",)

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None  # kvserve never refuses; OpenAI's schema requires the field


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(OmitsNone):
    omitted_when_none = ("tool_calls",)

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call: ``index``, ``id`` and name first, then argument fragments (OpenAI's shape)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @field_serializer("delta")
    def _only_what_changed(self, delta: ChatDelta) -> dict:
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(OmitsNone):
    omitted_when_none = ("usage",)

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for the base itself
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def generation_responses(whole: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict]:
    """OpenAPI ``responses`` of a generation route: the whole result as JSON or, with ``stream``, server-sent
    events whose ``data`` is a chunk as JSON text (an error body if generation fails mid-stream), then ``[DONE]``."""
    refs = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in (chunk, ErrorResponse)]
    payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": refs}}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}}}
    return {200: {"model": whole, "content": {"text/event-stream": {"schema": event}}},
            **error_responses(400, 401, 404, 413, 500, 503)}


STREAMED_CHUNKS = (CompletionResponse, ChatCompletionChunk)  # only the SSE responses name them: not collected by FastAPI
