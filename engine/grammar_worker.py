"""Grammar compilation in child processes the engine can abandon, bounded in CPU time and memory.

A grammar compile is C++ that cannot be interrupted: a thread running it cannot be stopped, and a
hostile schema (thousands of patterned properties, deep nesting, a huge enum) can run for minutes
or take the machine's memory. So each compile runs in a child process holding its own
``GrammarCompiler``; the worker's address space is capped (``RLIMIT_AS``), it runs at a lower
priority than the engine, and a compile that uses more CPU time than the timeout (CPU time, so a
busy engine does not make a fair schema fail) gets its worker killed and replaced in the background. The result comes
back serialized (``CompiledGrammar.serialize_json``, a few ms) and is cached in the parent.

The worker also refuses grammars that cannot end or whose shortest output is huge
(``grammar_check``) and rewrites structural tags' JSON Schema parts into the fixed-separator
grammar ``response_format`` uses, so tool arguments follow the same whitespace rule.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import re
import resource
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import xgrammar as xgr

from engine.grammar_check import check_grammar

logger = logging.getLogger(__name__)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `engine` is importable
WORKER_NICENESS = 19  # without SCHED_IDLE; at nice 5 a busy worker doubled 8 streams' ITL on 2 cores (OpenMP barriers)
WORKER_START_TIMEOUT_S = 120.0
CACHE_ENTRIES = 256
XGRAMMAR_LOCATION = re.compile(r"\[[\d:]+\] \S+\.(?:cc|h|cpp):\d+: ")  # "[18:44:39] /project/cpp/x.cc:5082: "


@dataclass(frozen=True)
class CompileJob:
    """kind: json_schema, json_object, regex, grammar (EBNF) or structural_tag; source: its text."""

    kind: str
    source: str


@dataclass(frozen=True)
class CompileLimits:
    timeout_s: float = 5.0  # CPU seconds one compile may use
    memory_bytes: int = 2 << 30  # address space a worker may add to what it holds at start
    max_shortest_output: int = 65536  # characters: the shortest text the grammar admits


class CompileError(ValueError):
    """The job cannot be compiled; the message is the client's (xgrammar's source locations removed)."""


def client_message(exc: BaseException) -> str:
    return XGRAMMAR_LOCATION.sub("", str(exc)).strip()


# --- the worker process ----------------------------------------------------------------------
def build_grammar(job: CompileJob) -> xgr.Grammar:
    if job.kind == "json_schema":
        return json_schema_grammar(job.source)
    if job.kind == "json_object":
        return json_schema_grammar('{"type": "object"}')
    if job.kind == "regex":
        return xgr.Grammar.from_regex(job.source)
    if job.kind == "grammar":
        return xgr.Grammar.from_ebnf(job.source)
    if job.kind == "structural_tag":
        return xgr.Grammar.from_structural_tag(json.dumps(fixed_separators(json.loads(job.source))))
    raise CompileError(f"unknown grammar kind {job.kind!r}")


def json_schema_grammar(schema: str) -> xgr.Grammar:
    """Fixed separators (", " and ": "): a model that knows no JSON cannot pad it with blanks."""
    return xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)


def fixed_separators(node: Any) -> Any:
    """A structural tag with each JSON Schema format replaced by the grammar ``json_schema_grammar``
    makes of it (xgrammar's own json_schema format admits free whitespace between every token)."""
    if isinstance(node, list):
        return [fixed_separators(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and node.get("style", "json") == "json" and "json_schema" in node:
        return {"type": "grammar", "grammar": str(json_schema_grammar(json.dumps(node["json_schema"])))}
    return {key: fixed_separators(value) for key, value in node.items()}


def compile_in_worker(compiler: xgr.GrammarCompiler, job: CompileJob, limits: CompileLimits) -> tuple[str, str]:
    """("ok", serialized grammar) or ("error", message for the client)."""
    try:
        grammar = build_grammar(job)
        problem = check_grammar(str(grammar), limits.max_shortest_output)
        if problem is not None:
            return "error", problem
        return "ok", compiler.compile_grammar(grammar).serialize_json()
    except MemoryError:
        return "error", f"compiling it needs more than the {limits.memory_bytes >> 20} MiB a compile may use"
    except Exception as exc:  # xgrammar reports bad input as RuntimeError / ValueError
        message = client_message(exc)
        if "bad_alloc" in message:
            return "error", f"compiling it needs more than the {limits.memory_bytes >> 20} MiB a compile may use"
        return "error", message


def serve(conn: Connection) -> None:
    """The worker's loop: the tokenizer and limits first, then one job at a time until the pipe closes."""
    tokenizer_info, limits = conn.recv()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(tokenizer_info), max_threads=1,
                                   cache_enabled=False)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + limits.memory_bytes, resource.RLIM_INFINITY))
    conn.send(("ready", ""))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        conn.send(compile_in_worker(compiler, job, limits))


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def lower_priority(pid: int) -> None:
    """SCHED_IDLE where Linux has it (the worker runs only on a core the engine leaves idle), else nice 19."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, WORKER_NICENESS)
        except OSError:  # already gone: its first job reports it
            pass


def main() -> None:
    serve(Connection(int(sys.argv[1])))


# --- the parent ------------------------------------------------------------------------------
class Worker:
    """One compile process. A plain ``python -c`` child (not multiprocessing's spawn, which re-imports
    the parent's main module), niced at once, the tokenizer sent over its pipe once it listens."""

    def __init__(self) -> None:
        self.conn, child_conn = multiprocessing.Pipe()
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from engine.grammar_worker import main; main()", str(child_conn.fileno())],
            pass_fds=[child_conn.fileno()], env=env, stdin=subprocess.DEVNULL)
        child_conn.close()
        lower_priority(self.process.pid)

    def start(self, tokenizer_info: str, limits: CompileLimits) -> None:
        """Blocks for the child's imports (about 1.5 s of CPU): never on a request's path."""
        self.conn.send((tokenizer_info, limits))
        if not self.conn.poll(WORKER_START_TIMEOUT_S):
            raise RuntimeError(f"the grammar compiler process did not start in {WORKER_START_TIMEOUT_S:g} s")
        self.conn.recv()

    def cpu_seconds(self) -> float:
        """The worker's user + system CPU time (Linux); 0 elsewhere, leaving only the wall-clock bound."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        self.conn.close()


class CompilePool:
    """``compile(job)`` blocks its caller (a worker thread of the server, or the offline engine) until
    one of ``num_workers`` processes is free and has compiled the job; results are cached. Workers
    start, and killed ones are replaced, on background threads, so neither a server's start nor a
    timed-out request waits for a new process."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, num_workers: int = 1, limits: CompileLimits = CompileLimits()):
        self.info = tokenizer_info
        self.serialized_info = tokenizer_info.serialize_json()
        self.limits = limits
        self.idle: queue.Queue[Worker] = queue.Queue()
        self.workers: set[Worker] = set()  # idle, busy or starting: what the finalizer stops
        self.stopped = threading.Event()
        weakref.finalize(self, stop_workers, self.workers, self.stopped)  # an engine's workers end with it
        for _ in range(num_workers):
            self._replace(None)
        self.cache: OrderedDict[CompileJob, xgr.CompiledGrammar] = OrderedDict()
        self.lock = threading.Lock()
        self.num_killed = 0

    def cached(self, job: CompileJob) -> xgr.CompiledGrammar | None:
        with self.lock:
            grammar = self.cache.get(job)
            if grammar is not None:
                self.cache.move_to_end(job)
            return grammar

    def compile(self, job: CompileJob) -> xgr.CompiledGrammar:
        grammar = self.cached(job)
        if grammar is not None:
            return grammar
        worker = self.idle.get()
        try:
            status, payload = self._run(worker, job)
        except BaseException:
            self._replace(worker)
            raise
        self.idle.put(worker)
        if status != "ok":
            raise CompileError(payload)
        grammar = xgr.CompiledGrammar.deserialize_json(payload, self.info)
        with self.lock:
            self.cache[job] = grammar
            if len(self.cache) > CACHE_ENTRIES:
                self.cache.popitem(last=False)
        return grammar

    def _replace(self, worker: Worker | None) -> None:
        """Kill ``worker`` (if any) and start a new one in the background; it joins ``idle`` when ready."""
        new = Worker()
        self.workers.add(new)
        threading.Thread(target=self._start, args=(worker, new), name="kvserve-grammar-start", daemon=True).start()

    def _start(self, old: Worker | None, new: Worker) -> None:
        if old is not None:
            self.workers.discard(old)
            old.kill()
        try:
            new.start(self.serialized_info, self.limits)
        except (OSError, EOFError, RuntimeError) as exc:  # its first job fails, and replaces it
            if self.stopped.is_set():
                return
            logger.error("the grammar compiler process did not start: %s", exc)
        self.idle.put(new)

    def _run(self, worker: Worker, job: CompileJob) -> tuple[str, str]:
        worker.conn.send(job)
        start_cpu, start = worker.cpu_seconds(), time.monotonic()
        wall_limit = max(10 * self.limits.timeout_s, 30.0)  # CPU time is the bound; this one only for a stuck worker
        while not worker.conn.poll(0.02):
            cpu = worker.cpu_seconds() - start_cpu
            if cpu > self.limits.timeout_s or time.monotonic() - start > wall_limit:
                self.num_killed += 1
                logger.warning("grammar compile stopped after %.1f s of CPU time (%s, %d bytes)", cpu, job.kind,
                               len(job.source))
                raise CompileError(f"compiling it took longer than the {self.limits.timeout_s:g} s limit "
                                   "(--structured-output-compile-timeout)")
            if worker.process.poll() is not None:
                raise CompileError(f"the grammar compiler failed on it (worker exit code {worker.process.returncode})")
        try:
            return worker.conn.recv()
        except EOFError:
            raise CompileError("the grammar compiler failed on it") from None


def stop_workers(workers: set[Worker], stopped: threading.Event) -> None:
    stopped.set()
    for worker in list(workers):
        worker.kill()
