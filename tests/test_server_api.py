"""A real `kvserve serve` process driven by the official openai client: every output is checked
against the offline engine (LLM.generate on the same model and settings) or the tokenizer."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from engine import LLM, SamplingParams
from server_process import running_server

ENGINE_FLAGS = ["--kv-cache-memory", "16MiB", "--max-num-batched-tokens", "256", "--served-model-name", "tiny"]
PROMPTS = ["Hello, my name is", "The capital of France", "def fibonacci(n):"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, *ENGINE_FLAGS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model), kv_cache_memory="16MiB", max_num_batched_tokens=256)


def greedy(llm, prompt_ids: list[list[int]], max_tokens: int, **kw):
    return llm.generate(prompt_token_ids=prompt_ids, sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, **kw))


def chat_ids(llm, messages) -> list[int]:
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/version").json()["version"] == "0.1.0"
    response = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"


def test_completions_greedy_equal_offline_and_usage_equals_tokenizer(client, llm):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    expected = greedy(llm, ids, 12)
    response = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert [c.finish_reason for c in response.choices] == [e.finish_reason for e in expected]
    assert response.object == "text_completion" and response.model == "tiny"
    assert response.usage.prompt_tokens == sum(len(i) for i in ids)
    assert response.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    # The two token-id prompt forms give the same completions.
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert [c.text for c in by_ids.choices] == [e.text for e in expected]
    one = client.completions.create(model="tiny", prompt=ids[0], max_tokens=12, temperature=0)
    assert one.choices[0].text == expected[0].text


def test_completions_stream_with_usage(client, llm):
    expected = greedy(llm, [llm.tokenizer.encode(PROMPTS[0])], 12)[0]
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_greedy_equal_offline_streamed_and_not(client, llm):
    ids = chat_ids(llm, CHAT)
    expected = greedy(llm, [ids], 10)[0]
    response = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_text_parts_and_roles_render_like_the_template(client, llm):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "Call the tool."},
                {"role": "assistant", "content": "Calling."},
                {"role": "tool", "content": "42", "tool_call_id": "call_1"},
                {"role": "user", "content": "And?"}]
    plain = [{**m, "content": "Be brief."} if i == 0 else m for i, m in enumerate(messages)]
    expected = greedy(llm, [chat_ids(llm, plain)], 6)[0]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(chat_ids(llm, plain))


def test_n_choices_differ_and_seed_reproduces(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=11)
    first = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert len({c.text for c in first.choices}) == 3  # seed + i per choice
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    other = client.completions.create(**{**kwargs, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    chat = dict(model="tiny", messages=CHAT, max_tokens=8, temperature=1.0, seed=5)
    assert (client.chat.completions.create(**chat).choices[0].message.content
            == client.chat.completions.create(**chat).choices[0].message.content)


def test_n_choices_streamed(client):
    texts: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for chunk in client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, n=2, seed=3, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, n=2, seed=3)
    assert texts == {c.index: c.message.content for c in whole.choices}


def test_stop_strings_cut_the_text(client, llm):
    ids = llm.tokenizer.encode(PROMPTS[2])
    full = greedy(llm, [ids], 24)[0].text
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full) - 3) if full[i:i + 3].strip())
    cut = full[:full.index(stop)]
    response = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "@@@@"])
    assert response.choices[0].text == cut
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].model_extra["stop_reason"] == stop
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_completion_logprobs_and_echo(client, llm):
    ids = llm.tokenizer.encode(PROMPTS[0])
    expected = greedy(llm, [ids], 6, logprobs=2, prompt_logprobs=2)[0]
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)
    assert "".join(lp.tokens) == response.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and top[token] == pytest.approx(logprob) and max(top.values()) == pytest.approx(logprob)

    echoed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1, echo=True)
    choice = echoed.choices[0]
    assert choice.text == PROMPTS[0] + response.choices[0].text
    assert len(choice.logprobs.tokens) == len(ids) + 6
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:len(ids)] == pytest.approx(
        [p.logprob for p in expected.prompt_logprobs[1:]], abs=1e-4)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert by_ids.choices[0].text == llm.tokenizer.decode(ids) + response.choices[0].text
    streamed = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True,
                                              logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == choice.logprobs.tokens


def test_chat_logprobs_streamed_and_not(client, llm):
    expected = greedy(llm, [chat_ids(llm, CHAT)], 5, logprobs=3)[0]
    response = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                              top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    assert "".join(c.token for c in content) == response.choices[0].message.content
    assert all(bytes(c.bytes) == c.token.encode() for c in content)
    streamed = [lp for chunk in client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                                                logprobs=True, top_logprobs=3, stream=True)
                for lp in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]
    assert [c.token for c in streamed] == [c.token for c in content]


def test_chat_logprobs_of_partial_characters_carry_their_real_bytes(client, llm):
    """Byte tokens (one byte of a 4-byte emoji each, forced by logit_bias) are not text on their own:
    ``bytes`` holds the token's real byte and ``token`` the byte escaped, as OpenAI returns them."""
    byte_ids = {0xF0: llm.tokenizer.convert_tokens_to_ids("ð"), 0x9F: llm.tokenizer.convert_tokens_to_ids("Ł")}
    response = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2,
                                              logit_bias={str(i): 100 for i in byte_ids.values()})
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.bytes) == 1 and entry.bytes[0] in byte_ids
        assert entry.token == f"\\x{entry.bytes[0]:x}"
        assert len(entry.top_logprobs) == 2  # the raw distribution's top (logit_bias not applied)
        assert all(bytes(t.bytes).decode("utf-8", "backslashreplace") == t.token for t in entry.top_logprobs)


def test_model_generation_config_fills_the_sampling_fields_a_request_leaves_out(client, llm):
    """Qwen2.5's generation_config.json recommends temperature 0.7, top_k 20, top_p 0.8 and
    repetition_penalty 1.1 (vLLM's --generation-config auto): a request that sends none of them is
    sampled with them; one that sends them all is not."""
    assert llm.engine.default_sampling == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    ids = [llm.tokenizer.encode(PROMPTS[0])]
    recommended = llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=12, seed=7,
                                                                                    **llm.engine.default_sampling))[0]
    plain = llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=12, seed=7))[0]
    assert recommended.token_ids != plain.token_ids
    served = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, seed=7)
    assert served.choices[0].text == recommended.text
    overridden = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, seed=7, temperature=1.0,
                                           top_p=1.0, extra_body={"top_k": -1, "repetition_penalty": 1.0})
    assert overridden.choices[0].text == plain.text


def test_generation_config_vllm_or_another_folder(model, tmp_path):
    """'vllm' recommends nothing; a folder's generation_config.json recommends what it sets, and
    LLM.generate without sampling parameters uses it (here temperature 0, greedy, for 5 tokens)."""
    assert LLM(str(model), kv_cache_memory="16MiB", generation_config="vllm").engine.default_sampling == {}
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.0, "max_new_tokens": 5}')
    llm = LLM(str(model), kv_cache_memory="16MiB", generation_config=str(tmp_path))
    assert llm.engine.default_sampling == {"temperature": 0.0, "max_tokens": 5}
    ids = [llm.tokenizer.encode(PROMPTS[1])]
    assert llm.generate(prompt_token_ids=ids)[0].token_ids == greedy(llm, ids, 5)[0].token_ids


def test_chat_without_max_tokens_stops_at_the_recommended_length(model, tmp_path):
    """A generation_config.json's max_new_tokens bounds a chat request that sends no max_tokens
    (one that does send it is not bounded by it)."""
    (tmp_path / "generation_config.json").write_text('{"max_new_tokens": 3}')
    with running_server(model, "--kv-cache-memory", "16MiB", "--generation-config", str(tmp_path)) as srv:
        client = srv.client()
        short = client.chat.completions.create(model=str(model), messages=CHAT, extra_body={"ignore_eos": True})
        assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
        longer = client.chat.completions.create(model=str(model), messages=CHAT, max_tokens=6, extra_body={"ignore_eos": True})
        assert longer.usage.completion_tokens == 6


def test_best_of_returns_the_most_likely(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=21)
    candidates = client.completions.create(n=4, logprobs=0, **kwargs).choices
    best = max(candidates, key=lambda c: sum(c.logprobs.token_logprobs))
    chosen = client.completions.create(n=1, best_of=4, **kwargs)
    assert len(chosen.choices) == 1 and chosen.choices[0].text == best.text
    assert chosen.usage.completion_tokens == 4 * 6


def test_32_concurrent_streams_each_equal_offline_greedy(server, llm):
    prompts = [f"Story number {i}: once upon a" for i in range(32)]
    expected = greedy(llm, [llm.tokenizer.encode(p) for p in prompts], 16)

    async def one(client, prompt: str) -> str:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        client = server.async_client()
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(all_of_them()) == [e.text for e in expected]


def wait_until_idle(server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        if stats["num_running"] == stats["num_waiting"] == stats["num_unfinished"] == 0 \
                and stats["num_free_blocks"] == stats["num_blocks"] and stats["num_sequences_admitted"] == 0:
            return stats
        assert time.monotonic() < deadline, f"server did not free the request: {stats}"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_blocks_and_server_goes_on(server, client):
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True}
    generated = server.stats()["generation_tokens"]
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
            assert received
            running = server.stats()
            assert running["num_unfinished"] == 1 and running["num_free_blocks"] < running["num_blocks"]
    # Freed because it was aborted, not because it ran to its 900 tokens.
    assert wait_until_idle(server)["generation_tokens"] - generated < 900
    # A non-streamed request whose client gives up is aborted too.
    generated = server.stats()["generation_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    assert wait_until_idle(server)["generation_tokens"] - generated < 900
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_tokenize_and_detokenize(server, llm):
    response = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert response["tokens"] == llm.tokenizer.encode(PROMPTS[0]) and response["count"] == len(response["tokens"])
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == chat_ids(llm, CHAT)
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": response["tokens"]}).json() == {"prompt": PROMPTS[0]}


def test_one_log_line_per_finished_request(server, client):
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, n=2, temperature=0)
    deadline = time.monotonic() + 5
    while not (lines := [line for line in server.log_text().splitlines() if response.id in line]):
        assert time.monotonic() < deadline, server.log_text()[-2000:]
        time.sleep(0.05)
    assert len(lines) == 1
    prompt_tokens = response.usage.prompt_tokens
    assert f"prompt_tokens={prompt_tokens} completion_tokens=8 " in lines[0]
    assert all(f" {field}=" in lines[0] for field in ("queue", "ttft", "total")) and lines[0].endswith("finish=length")


def test_explicit_nulls_and_huge_seeds_are_accepted(client):
    """The openai client sends null for optional fields it was given as None; seeds are any integer."""
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, n=None, logprobs=None, stream=None,
                                         seed=2**64 + 5, temperature=None)
    assert out.choices[0].finish_reason == "length" and len(out.choices) == 1
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, seed=2**64 + 5, n=2)
    assert len(again.choices) == 2
