"""kvserve's engine: everything below the HTTP line, usable as a library."""

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.outputs import GenerationOutput, RequestOutput, TokenLogprob
from engine.request import SamplingParams

__all__ = ["LLM", "LLMEngine", "LoRARequest", "InvalidRequestError", "AsyncEngine", "EngineConfig", "SamplingParams", "GenerationOutput",
           "RequestOutput", "TokenLogprob"]
