"""deploy/ against the real thing: the dashboard's and the autoscaler's metrics against a real server's
/metrics, the Prometheus config through promtool and a real Prometheus scraping a real ``kvserve serve``,
the Kubernetes manifests against the Kubernetes schemas and the server's own flags, the compose file
against the Compose schema, so none of them drifts from the server unnoticed."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import openai
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from server.cli import parser as kvserve_parser
from server_process import Server, free_port, running_server, stop, wait_ready

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "kvserve.json"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
METRIC = re.compile(r"kvserve:[A-Za-z0-9_:]+")
# The sample names each metric type exposes, from the family name prometheus_client's parser reports.
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
MAX_TOKENS = (5, 7)  # completions the served fixture runs; ignore_eos makes each exactly this long


def dashboard_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard_panels(dashboard["panels"]) for t in p.get("targets", [])]


def k8s_resources() -> dict[str, dict]:
    """deploy/k8s's resources by kind (one of each)."""
    docs = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    kinds = [doc["kind"] for doc in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return dict(zip(kinds, docs))


def kvserve_job(config: dict) -> dict:
    """The kvserve scrape job of a Prometheus config."""
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "kvserve"]
    return job


def adapter_rules() -> list[dict]:
    return yaml.safe_load(k8s_resources()["ConfigMap"]["data"]["config.yaml"])["rules"]


def queried_metrics() -> set[str]:
    """The sample names the dashboard and the autoscaler's adapter rules read."""
    exprs = dashboard_exprs() + [rule["seriesQuery"] for rule in adapter_rules()]
    return {name for expr in exprs for name in METRIC.findall(expr)}


@pytest.fixture(scope="module")
def served(tiny_model) -> Iterator[Server]:
    """A real kvserve after known traffic: completions of exactly MAX_TOKENS tokens (one streamed) and one
    rejected request, so histograms, counters and the error counter all have samples; --enable-lora so the
    LoRA metrics are on /metrics too."""
    with running_server(tiny_model("qwen2"), "--kv-cache-memory", "16MiB", "--enable-lora") as server:
        client = server.client()
        model = client.models.list().data[0].id
        extra = {"ignore_eos": True}
        done = client.completions.create(model=model, prompt="Once upon a time", max_tokens=MAX_TOKENS[0],
                                         extra_body=extra)
        assert done.usage.completion_tokens == MAX_TOKENS[0]
        chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=MAX_TOKENS[1], stream=True,
                                                stream_options={"include_usage": True}, extra_body=extra))
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS[1]
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="Hello", max_tokens=-1)
        yield server


def kvserve_families(server: Server) -> list[Metric]:
    """kvserve's metric families on /metrics, with or without samples (``_created`` ones aside)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).raise_for_status().text
    return [family for family in text_string_to_metric_families(text) if family.name.startswith("kvserve:")
            and family.type in SAMPLE_SUFFIXES and not family.name.endswith("_created")]


def sample_names(family: Metric) -> set[str]:
    return {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}


def test_dashboard_and_autoscaler_metrics_exist(served: Server) -> None:
    exposed = {name: family for family in kvserve_families(served) for name in sample_names(family)}
    missing = sorted(queried_metrics() - exposed.keys())
    assert not missing, f"queried by deploy/ but not on /metrics: {missing}"
    unlabelled = sorted({sample.name for name in queried_metrics() for sample in exposed[name].samples
                         if not sample.labels.get("model_name")})
    assert not unlabelled, f"samples without the model_name label the dashboard filters on: {unlabelled}"


def test_dashboard_charts_every_metric(served: Server) -> None:
    """A metric the server exports but no panel shows is a dashboard gap."""
    uncharted = sorted(f.name for f in kvserve_families(served) if not sample_names(f) & queried_metrics())
    assert not uncharted, f"on /metrics but on no dashboard panel: {uncharted}"


def test_dashboard_filters_every_query_by_model_and_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert re.fullmatch(r"label_values\(kvserve:\w+, model_name\)", variables["model_name"]["definition"])
    panels = list(dashboard_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            selectors = re.findall(r"kvserve:[A-Za-z0-9_:]+(\{[^}]*\})?", target["expr"])
            assert selectors and all(s == '{model_name=~"$model_name"}' for s in selectors), target["expr"]


def test_promtool_accepts_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: apt-get install prometheus (.ci/run does)"
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@contextmanager
def running_prometheus(config: dict, workdir: Path) -> Iterator[str]:
    """A real Prometheus on a free loopback port with CONFIG; yields its URL."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus not found: apt-get install prometheus (.ci/run does)"
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log = workdir / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([prometheus, f"--config.file={workdir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address={url.removeprefix('http://')}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"{url}/-/ready", proc, log, timeout=30)
        yield url
    finally:
        stop(proc, timeout=10)


def query(prometheus: str, promql: str) -> list[dict]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    return body["data"]["result"]


def test_prometheus_scrapes_kvserve(served: Server, tmp_path: Path) -> None:
    """deploy/'s scrape job, pointed at the test server: the token count the fixture produced arrives
    in Prometheus, and the dashboard's, variable's and adapter's queries run on the real series."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    kvserve_job(config).update(scrape_interval="1s", static_configs=[{"targets": [served.url.removeprefix("http://")]}])
    with running_prometheus(config, tmp_path) as prometheus:
        deadline = time.monotonic() + 30
        while not (series := query(prometheus, "kvserve:generation_tokens_total")):
            if time.monotonic() > deadline:
                targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
                pytest.fail(f"no kvserve:generation_tokens_total after 30 s; targets: {targets}")
            time.sleep(0.5)
        assert [float(s["value"][1]) for s in series] == [sum(MAX_TOKENS)], series
        assert series[0]["metric"]["job"] == "kvserve" and series[0]["metric"]["model_name"]

        for expr in dashboard_exprs():
            query(prometheus, expr.replace("$__rate_interval", "1m").replace("$model_name", ".*"))
        models = httpx.get(f"{prometheus}/api/v1/label/model_name/values", timeout=10,
                           params={"match[]": "kvserve:num_requests_running"}).json()["data"]
        assert models == [series[0]["metric"]["model_name"]]
        for rule in adapter_rules():  # as prometheus-adapter renders it for a namespace's pods
            [name] = METRIC.findall(rule["seriesQuery"])
            promql = (rule["metricsQuery"].replace("<<.Series>>", name)
                      .replace("<<.LabelMatchers>>", 'job="kvserve"').replace("<<.GroupBy>>", "instance"))
            assert [float(s["value"][1]) for s in query(prometheus, promql)] == [0.0], promql  # nothing waits now


# prometheus-operator's ServiceMonitor is a CRD, absent from the Kubernetes schemas: this checks the
# fields these manifests use, and rejects any other (a typo) at the levels it describes.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "required": ["port"],
                    "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                   "scheme": {"enum": ["http", "https"]},
                                   "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                                   "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"}}}},
            },
        },
    },
}


def test_kubernetes_manifests_match_schemas() -> None:
    resources = k8s_resources()
    assert set(resources) == {"Deployment", "PersistentVolumeClaim", "Service", "HorizontalPodAutoscaler",
                              "ConfigMap", "ServiceMonitor"}
    version = kubernetes_validate.latest_version()
    for kind, resource in resources.items():
        if kind == "ServiceMonitor":
            jsonschema.validate(resource, SERVICE_MONITOR_SCHEMA)
        else:  # strict: unknown fields (typos) fail too
            kubernetes_validate.validate(resource, version, strict=True)


def test_kubernetes_manifests_fit_together_and_the_server() -> None:
    """What the schemas cannot see: selectors, ports and names that must agree across resources, and
    the container's args, probes and grace period against kvserve's real flags and endpoints."""
    r = k8s_resources()
    deployment, service, monitor, hpa = r["Deployment"], r["Service"], r["ServiceMonitor"], r["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()

    args = kvserve_parser().parse_args(container["args"])  # exits on a flag kvserve does not have
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names[service["spec"]["ports"][0]["targetPort"]] == args.port
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading takes minutes"
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + args.shutdown_timeout, "SIGKILL mid-drain"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    [mount] = container["volumeMounts"]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == r["PersistentVolumeClaim"]["metadata"]["name"]
    assert Path(args.model).parent == Path(mount["mountPath"])

    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    adapter_metrics = {rule["name"]["as"] for rule in adapter_rules()}
    for rule in adapter_rules():
        [series] = METRIC.findall(rule["seriesQuery"])
        assert re.search(rule["name"]["matches"], series), rule
    hpa_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert hpa_metrics and hpa_metrics <= adapter_metrics


def test_compose_file_matches_compose_spec_and_references_what_exists() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    # the Compose Specification's JSON schema, as check-jsonschema ships it (no docker compose here)
    spec = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    jsonschema.validate(compose, json.loads(spec.read_text()))
    services = compose["services"]
    assert set(services) == {"kvserve", "prometheus", "grafana"}
    assert (DEPLOY / services["kvserve"]["build"]["context"] / "Dockerfile").is_file()
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
                mounts[target] = DEPLOY / source

    command = [re.sub(r"\$\{[^}]*\}", "model", str(arg)) for arg in services["kvserve"]["command"]]
    args = kvserve_parser().parse_args(command)
    job = kvserve_job(yaml.safe_load(PROMETHEUS_YML.read_text()))
    assert job["static_configs"][0]["targets"] == [f"kvserve:{args.port}"]
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML

    provisioning = mounts["/etc/grafana/provisioning"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "kvserve.yaml").read_text())["providers"]
    dashboards = [path for target, path in mounts.items() if Path(target).parent == Path(provider["options"]["path"])]
    assert dashboards == [DASHBOARD]
