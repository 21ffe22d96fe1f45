"""LoRA adapters through a real `kvserve serve --enable-lora` process and the openai client: each
adapter's output equals the offline engine's (which tests/test_lora.py holds to peft's), /v1/models lists adapters with their parent,
adapters load and unload at run time (one in use finishes), bad adapters are 400s naming the problem,
and /metrics shows the adapters of running requests."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, LoRARequest, SamplingParams
from server.cli import parser, serve
from server_process import kvserve_command, running_server
from test_lora import make_adapter

ATTN, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Hello, my name is", "The capital of France", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Say something."}]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("server-adapters")
    made = {"attn": make_adapter(model, root / "attn", 1, r=8, lora_alpha=16, target_modules=ATTN),
            "mlp": make_adapter(model, root / "mlp", 2, r=4, lora_alpha=8, target_modules=MLP, use_rslora=True),
            "rank32": make_adapter(model, root / "rank32", 3, r=32, lora_alpha=32, target_modules=["q_proj"])}
    dora = shutil.copytree(made["attn"], root / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return {**made, "dora": dora}


@pytest.fixture(scope="module")
def server(model, adapters):
    with running_server(model, "--kv-cache-memory", "16MiB", "--served-model-name", "tiny", "--generation-config", "vllm",
                        "--enable-lora", "--lora-modules", f"attn={adapters['attn']}", "--max-loras", "2",
                        "--allow-runtime-lora-updating") as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model), kv_cache_memory="16MiB", enable_lora=True, max_loras=2)


def offline(llm: LLM, prompts: list[list[int]], lora: LoRARequest | None, max_tokens: int = MAX_TOKENS) -> list[str]:
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                                 ignore_eos=True), lora_request=lora)
    return [o.text for o in outs]


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def models(server) -> dict[str, dict]:
    return {card["id"]: card for card in server.client().models.with_raw_response.list().http_response.json()["data"]}


def test_models_list_the_adapters_with_their_parent(server, adapters):
    cards = models(server)
    assert list(cards) == ["tiny", "attn"]
    assert cards["attn"]["parent"] == "tiny" and cards["attn"]["root"] == str(adapters["attn"])
    assert cards["tiny"]["parent"] is None
    assert server.client().models.retrieve("attn").id == "attn"


def test_base_and_adapter_requests_at_once_equal_offline(server, llm, adapters):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    expected = {"tiny": offline(llm, ids, None), "attn": offline(llm, ids, LoRARequest("attn", 1, str(adapters["attn"])))}
    assert expected["attn"] != expected["tiny"]  # the adapter changes the output (tests/test_lora.py: as peft's)

    async def run() -> list:
        client = server.async_client()
        return await asyncio.gather(*(client.completions.create(model=name, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                                                extra_body={"ignore_eos": True})
                                      for name in ("tiny", "attn") for p in PROMPTS))

    responses = asyncio.run(run())
    assert [r.choices[0].text for r in responses] == expected["tiny"] + expected["attn"]
    assert [r.model for r in responses] == ["tiny"] * 3 + ["attn"] * 3


def test_chat_with_an_adapter_equals_offline(server, llm, adapters):
    text = llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    expected = offline(llm, [ids], LoRARequest("attn", 1, str(adapters["attn"])))[0]
    response = server.client().chat.completions.create(model="attn", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                       extra_body={"ignore_eos": True})
    assert response.choices[0].message.content == expected and response.model == "attn"


def test_load_use_and_unload_at_run_time(server, llm, adapters):
    loaded = post(server, "/v1/load_lora_adapter", lora_name="mlp", lora_path=str(adapters["mlp"]))
    assert loaded.status_code == 200, loaded.text
    assert models(server)["mlp"]["parent"] == "tiny"
    ids = llm.tokenizer.encode(PROMPTS[0])
    expected = offline(llm, [ids], LoRARequest("mlp", 7, str(adapters["mlp"])))[0]
    client = server.client()
    assert client.completions.create(model="mlp", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text == expected
    assert post(server, "/v1/unload_lora_adapter", lora_name="mlp").status_code == 200
    assert "mlp" not in models(server)
    with pytest.raises(openai.NotFoundError) as gone:
        client.completions.create(model="mlp", prompt=PROMPTS[0], max_tokens=2)
    assert gone.value.body["code"] == "model_not_found" and gone.value.body["param"] == "model"
    again = post(server, "/v1/unload_lora_adapter", lora_name="mlp")
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"


def test_unloading_an_adapter_in_use_lets_its_request_finish(server, llm, adapters):
    assert post(server, "/v1/load_lora_adapter", lora_name="busy", lora_path=str(adapters["mlp"])).status_code == 200
    ids = llm.tokenizer.encode(PROMPTS[1])
    expected = offline(llm, [ids], LoRARequest("busy", 9, str(adapters["mlp"])), max_tokens=300)[0]
    stream = server.client().completions.create(model="busy", prompt=PROMPTS[1], max_tokens=300, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    assert post(server, "/v1/unload_lora_adapter", lora_name="busy").status_code == 200
    assert server.stats()["running_loras"] == ["busy"]  # unloaded while its request runs
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected


@pytest.mark.parametrize("name, path, param, names", [
    ("missing", "/nonexistent/adapter", "lora_path", "adapter_config.json"),
    ("big", "rank32", "lora_path", "max_lora_rank"),
    ("dora", "dora", "lora_path", "use_dora"),
    ("attn", "mlp", "lora_name", "already served"),
    ("tiny", "mlp", "lora_name", "already served"),
])
def test_bad_adapters_are_400s_naming_the_problem(server, adapters, name, path, param, names):
    response = post(server, "/v1/load_lora_adapter", lora_name=name, lora_path=str(adapters.get(path, path)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and names in error["message"], error
    assert list(models(server)) == ["tiny", "attn"]  # nothing half-loaded
    assert post(server, "/v1/load_lora_adapter", lora_name=name).status_code == 400  # lora_path missing


def test_unknown_adapter_is_404(server):
    with pytest.raises(openai.NotFoundError) as unknown:
        server.client().chat.completions.create(model="no-such-adapter", messages=CHAT, max_tokens=2)
    assert unknown.value.body["code"] == "model_not_found"


def test_metrics_show_running_adapters_and_requests_per_adapter(server):
    def scrape() -> dict:
        families = text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    before = scrape().get(("kvserve:lora_requests_total", (("lora_name", "attn"), ("model_name", "tiny"))), 0)
    stream = server.client().completions.create(model="attn", prompt=PROMPTS[2], max_tokens=80, stream=True,
                                                extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    during = scrape()
    list(chunks)
    info = [dict(labels) for name, labels in during if name == "kvserve:lora_requests_info"]
    assert info == [{"model_name": "tiny", "max_lora": "2", "running_lora_adapters": "attn", "waiting_lora_adapters": ""}]
    after = scrape()
    assert after[("kvserve:lora_requests_total", (("lora_name", "attn"), ("model_name", "tiny")))] == before + 1
    idle = [dict(labels) for name, labels in after if name == "kvserve:lora_requests_info"]
    assert idle[0]["running_lora_adapters"] == ""


def test_runtime_updating_off_by_default_and_flags_checked(model, adapters):
    with running_server(model, "--kv-cache-memory", "16MiB", "--enable-lora") as srv:
        refused = post(srv, "/v1/load_lora_adapter", lora_name="mlp", lora_path=str(adapters["mlp"]))
        assert refused.status_code == 404 and "--allow-runtime-lora-updating" in refused.json()["error"]["message"]
    for flags, says in [(["--lora-modules", f"a={adapters['mlp']}"], "need --enable-lora"),
                        (["--enable-lora", "--lora-modules", "no-path"], "NAME=PATH")]:
        with pytest.raises(SystemExit, match=says):  # refused before anything loads, so checked in-process
            serve(parser().parse_args(["serve", str(model), *flags]))
    done = subprocess.run([*kvserve_command(), "serve", str(model), "--kv-cache-memory", "16MiB", "--enable-lora",
                           "--lora-modules", "a=/nonexistent"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "adapter_config.json" in done.stderr, done.stderr[-2000:]
