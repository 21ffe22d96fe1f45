"""LoRA adapters on one base model: loaded from PEFT's format, stacked in slots, mixed in one batch.

An adapter updates a weight W to W + scale * B A (A: r x in, B: out x r). It is never merged into
the base weights: the base matmul runs once for the whole batch and each adapted linear then adds,
for each row, ``x A^T B^T scale`` of that row's adapter (rows of the base model add nothing). The
adapters of a step sit in ``max_loras`` preallocated slots per adapted linear (``LoRALayer``); a
step's rows point at their slots (``LoRABatch``), so one batch mixes the base and several adapters.
On CPU a long run of rows of one adapter (a prefill chunk) is multiplied in place, and the other
rows are grouped by slot into one padded batched matmul (shrink to the rank, then expand);
on CUDA a segmented Triton kernel (engine.lora_triton) reads the same slots, and a decode step's
CUDA graph takes the rows' slots as an input tensor.

Our fused q/k/v and gate/up matrices take an adapter's pieces in their slices: A stacks each slice's
rows at ``slice * max_rank``, B (transposed, the scale folded in) holds slice s's columns in s's
column range. Loaded adapters live on the host in an LRU pool of ``max_cpu_loras``; the scheduler
keeps at most ``max_loras`` distinct adapters running, so a step's adapters always fit the slots.
Each adapter has a content hash, the root of its requests' prefix-cache block hashes: two adapters
(or an adapter and the base) never share KV they computed differently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
LONG_RUN = 8  # consecutive rows of one adapter multiplied in place on CPU rather than gathered (LoRABatch)
# PEFT's module name -> (our linear under model.layers.N, slice of it)
TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1), "v_proj": ("self_attn.qkv_proj", 2),
           "o_proj": ("self_attn.o_proj", 0), "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
           "down_proj": ("mlp.down_proj", 0)}
ADAPTED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
WEIGHT_KEY = re.compile(r"base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight")
# adapter_config.json fields whose adapters change more than q/k/v/o/gate/up/down by a low-rank product
REFUSED = {"use_dora": "DoRA adapters", "modules_to_save": "adapters that fully train modules (modules_to_save)",
           "trainable_token_indices": "adapters that add or train tokens", "lora_bias": "adapters with a LoRA bias",
           "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters", "layer_replication": "layer replication",
           "alora_invocation_tokens": "activated LoRA"}


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs with, as vLLM names it: ``lora_int_id`` identifies it (> 0)."""

    lora_name: str
    lora_int_id: int
    lora_path: str


def _refuse(message: str) -> InvalidRequestError:
    return InvalidRequestError("lora_path", message)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class LoRAAdapter:
    """An adapter read from a PEFT folder, in the model's layout: per adapted linear (its name in our
    model), the (slice, A [r, in], B^T * scale [r, n]) pieces it adds."""

    def __init__(self, request: LoRARequest, model: nn.Module, max_rank: int, dtype: torch.dtype):
        self.request = request
        folder = Path(request.lora_path)
        if not (folder / CONFIG_FILE).is_file():
            raise _refuse(f"lora_path {request.lora_path!r}: no {CONFIG_FILE} there (a folder peft's save_pretrained wrote)")
        if not (folder / WEIGHTS_FILE).is_file():
            raise _refuse(f"lora_path {request.lora_path!r}: no {WEIGHTS_FILE} there (only safetensors weights are read)")
        config_bytes, weight_bytes = (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()
        self.uid = hashlib.sha256(config_bytes + b"\0" + weight_bytes).digest()  # what the KV depends on
        try:
            config = json.loads(config_bytes)
            tensors = load_file(folder / WEIGHTS_FILE)
        except (ValueError, OSError) as exc:
            raise _refuse(f"lora_path {request.lora_path!r}: cannot read the adapter: {exc}") from None
        self._check_config(config)
        self.pieces: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self.rank = 0
        modules = dict(model.named_modules())
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = WEIGHT_KEY.fullmatch(key)
            if match is None or match.group(3) not in TARGETS:
                raise _refuse(f"adapter weight {key!r} is not supported: LoRA on q/k/v/o/gate/up/down projections only")
            layer, module = int(match.group(2)), match.group(1)
            if layer >= model.config.num_hidden_layers:
                raise _refuse(f"adapter weight {key!r}: the base model has {model.config.num_hidden_layers} layers")
            pairs.setdefault(module, {})[match.group(4)] = tensor
        for module, pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise _refuse(f"adapter module {module}: lora_A and lora_B must both be present")
            self._add(module, pair["A"], pair["B"], config, modules, max_rank, dtype)
        if not self.pieces:
            raise _refuse(f"lora_path {request.lora_path!r}: the adapter has no LoRA weights")

    @staticmethod
    def _check_config(config: dict) -> None:
        if config.get("peft_type", "LORA") != "LORA":
            raise _refuse(f"peft_type {config.get('peft_type')!r} is not supported (only LORA)")
        for name, what in REFUSED.items():
            if config.get(name):
                raise _refuse(f"{CONFIG_FILE}: {name} is set; {what} are not supported")
        if config.get("bias", "none") != "none":
            raise _refuse(f"{CONFIG_FILE}: bias {config['bias']!r} is not supported (only 'none')")

    def _add(self, module: str, a: torch.Tensor, b: torch.Tensor, config: dict, modules: dict,
             max_rank: int, dtype: torch.dtype) -> None:
        layer_prefix, name = module.rsplit(".", 2)[0], module.rsplit(".", 1)[1]
        target, slice_index = TARGETS[name]
        linear = modules[f"{layer_prefix}.{target}"]
        rank = a.shape[0]
        sizes = slice_sizes(modules, f"{layer_prefix}.{target}")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank or a.shape[1] != linear.in_features \
                or b.shape[0] != sizes[slice_index]:
            raise _refuse(f"adapter module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                          f"the base model's {name} ({sizes[slice_index]} x {linear.in_features})")
        if rank > max_rank:
            raise _refuse(f"adapter module {module} has rank {rank}, above max_lora_rank {max_rank} (--max-lora-rank)")
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        self.pieces.setdefault(f"{layer_prefix}.{target}", []).append(
            (slice_index, a.to(dtype).contiguous(), (b.float().t() * scale).to(dtype).contiguous()))
        self.rank = max(self.rank, rank)


def slice_sizes(modules: dict, linear_name: str) -> tuple[int, ...]:
    """The output sizes of a (possibly fused) linear's slices."""
    owner, attr = linear_name.rsplit(".", 1)
    return getattr(modules[owner], "shard_sizes", {}).get(attr, (modules[linear_name].out_features,))


@dataclass
class LoRABatch:
    """One step's rows and their adapter slots. CPU: ``runs`` (start, end, slot) of at least LONG_RUN
    consecutive rows of one slot (a prefill chunk; decodes of one adapter side by side) multiply in place;
    the other adapted rows (``rows``, sorted by slot; None: there are none) are gathered into a
    [num_slots, max_rows] grid over slots ``lo..lo+num_slots``, at places ``pad`` (None: they fill it
    exactly), for one batched matmul, so a long run never pads the grid to its length. CUDA: every run
    as a segment, or a CUDA graph's static buffers of one segment per row."""

    runs: list[tuple[int, int, int]] = field(default_factory=list)
    rows: torch.Tensor | None = None
    pad: torch.Tensor | None = None
    lo: int = 0
    num_slots: int = 0
    max_rows: int = 0
    seg_start: torch.Tensor | None = None
    seg_len: torch.Tensor | None = None
    seg_slot: torch.Tensor | None = None
    max_seg_len: int = 1

    @classmethod
    def build(cls, item_slots: list[int], num_rows: list[int], device: torch.device) -> LoRABatch | None:
        """The batch of a step whose item i (a request's rows, in order) has ``num_rows[i]`` rows of slot
        ``item_slots[i]`` (-1: the base model); None when no row has an adapter. Runs come from the
        items, so only rows of short runs are visited one by one."""
        runs: list[tuple[int, int, int]] = []
        start = 0
        for slot, n in zip(item_slots, num_rows):
            if runs and runs[-1][1] == start and runs[-1][2] == slot:  # the run goes on into this item
                runs[-1] = (runs[-1][0], start + n, slot)
            elif slot >= 0 and n:
                runs.append((start, start + n, slot))
            start += n
        if not runs:
            return None
        if device.type == "cuda":
            to = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
            return cls(seg_start=to([a for a, _, _ in runs]), seg_len=to([b - a for a, b, _ in runs]),
                       seg_slot=to([slot for _, _, slot in runs]), max_seg_len=max(b - a for a, b, _ in runs))
        short = sorted((slot, i) for a, b, slot in runs if b - a < LONG_RUN for i in range(a, b))
        long = [run for run in runs if run[1] - run[0] >= LONG_RUN]
        if not short:
            return cls(runs=long)
        lo, hi = short[0][0], short[-1][0] + 1
        counts, places = [0] * (hi - lo), []
        for slot, _ in short:  # each row's place within its slot's group
            places.append(counts[slot - lo])
            counts[slot - lo] += 1
        max_rows = max(counts)
        pad = [(slot - lo) * max_rows + k for (slot, _), k in zip(short, places)]
        to = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return cls(runs=long, rows=to([i for _, i in short]), pad=None if pad == list(range((hi - lo) * max_rows)) else to(pad),
                   lo=lo, num_slots=hi - lo, max_rows=max_rows)


class LoRALayer:
    """The adapter slots of one linear layer, and the per-row low-rank product they add to its output."""

    def __init__(self, linear: nn.Module, sizes: tuple[int, ...], manager: LoRAManager):
        self.manager = manager
        self.rank = manager.max_rank
        self.columns = [(sum(sizes[:s]), n) for s, n in enumerate(sizes)]  # each slice's column range
        weight = linear.weight
        self.A = torch.zeros(manager.max_loras, len(sizes) * self.rank, linear.in_features, dtype=manager.dtype,
                             device=weight.device)
        self.B = torch.zeros(manager.max_loras, self.rank, linear.out_features, dtype=manager.dtype, device=weight.device)

    def load(self, slot: int, pieces: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        for s, a, bt in pieces:
            start, n = self.columns[s]
            self.A[slot, s * self.rank:s * self.rank + a.shape[0]].copy_(a)
            self.B[slot, :bt.shape[0], start:start + n].copy_(bt)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.manager.batch
        if batch is None:
            return y
        if batch.seg_slot is not None:
            return self._add_segments(x, y, batch)
        r = self.rank
        for start, end, slot in batch.runs:  # matmuls adding into y's rows and slices in place
            t = x[start:end] @ self.A[slot].t()
            for s, (first, n) in enumerate(self.columns):
                y[start:end, first:first + n].addmm_(t[:, s * r:(s + 1) * r], self.B[slot, :, first:first + n])
        if batch.rows is None:
            return y
        k, m = batch.num_slots, batch.max_rows
        xs = x.index_select(0, batch.rows)
        if batch.pad is not None:
            xs = xs.new_zeros(k * m, x.shape[1]).index_copy_(0, batch.pad, xs)
        a, b = self.A[batch.lo:batch.lo + k], self.B[batch.lo:batch.lo + k]
        t = torch.bmm(xs.view(k, m, -1), a.transpose(1, 2))
        if len(self.columns) == 1:
            u = torch.bmm(t, b)
        else:  # one scatter of whole rows below: index_add_ into a column slice of y is ~2x slower
            u = torch.cat([torch.bmm(t[..., s * r:(s + 1) * r], b[..., first:first + n])
                           for s, (first, n) in enumerate(self.columns)], dim=-1)
        u = u.view(k * m, -1)
        y.index_add_(0, batch.rows, u if batch.pad is None else u.index_select(0, batch.pad))
        return y

    def _add_segments(self, x: torch.Tensor, y: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        from engine.lora_triton import lora_expand, lora_shrink  # Triton is imported only where it runs

        t = torch.empty(x.shape[0], self.A.shape[1], dtype=torch.float32, device=x.device)
        segments = (batch.seg_start, batch.seg_len, batch.seg_slot, batch.max_seg_len)
        lora_shrink(x, self.A, *segments, t)
        for s, (start, n) in enumerate(self.columns):
            lora_expand(t, self.B, y, *segments, s * self.rank, start, n)
        return y


class LoRAManager:
    """The adapters of one model: the host pool (LRU, ``max_cpu_loras``), the slots (LRU, ``max_loras``)
    and the batch of the step in progress, which every adapted linear reads."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int, dtype: torch.dtype):
        self.model, self.max_loras, self.max_rank, self.max_cpu_loras = model, max_loras, max_rank, max_cpu_loras
        self.dtype = dtype
        modules = dict(model.named_modules())
        self.layers: dict[str, LoRALayer] = {}
        for i in range(model.config.num_hidden_layers):
            for target in ADAPTED_LINEARS:
                name = f"model.layers.{i}.{target}"
                self.layers[name] = modules[name].lora = LoRALayer(modules[name], slice_sizes(modules, name), self)
        self.pool: OrderedDict[int, LoRAAdapter] = OrderedDict()  # lora_int_id -> adapter, least recent first
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # adapter uid -> its slot, least recent first
        self.batch: LoRABatch | None = None
        self.slot_loads = 0  # adapters copied into a slot (a reload after eviction counts again)
        self.item_slots: list[int] = []  # the step's slot per item; a decode step's items are its rows (a CUDA graph's input)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.A, layer.B))

    def get(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter, from the pool or read from its folder (InvalidRequestError naming what is wrong)."""
        if not isinstance(request.lora_int_id, int) or request.lora_int_id < 1:
            raise InvalidRequestError("lora_request", f"lora_int_id must be an integer >= 1, got {request.lora_int_id!r}")
        adapter = self.pool.get(request.lora_int_id)
        if adapter is None or adapter.request.lora_path != request.lora_path:
            start = time.perf_counter()
            adapter = LoRAAdapter(request, self.model, self.max_rank, self.dtype)
            logger.info("LoRA adapter %s (id %d, rank %d) read from %s in %.1f ms", request.lora_name,
                        request.lora_int_id, adapter.rank, request.lora_path, (time.perf_counter() - start) * 1e3)
            self.pool[request.lora_int_id] = adapter
        self.pool.move_to_end(request.lora_int_id)
        while len(self.pool) > self.max_cpu_loras:  # requests holding an evicted adapter keep it alive
            self.pool.popitem(last=False)
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests already holding it finish with it."""
        return self.pool.pop(lora_int_id, None) is not None

    def prepare(self, adapters: list[LoRAAdapter | None], num_rows: list[int], device: torch.device) -> None:
        """Put the step's adapters in slots (evicting the least recently used others) and set its batch:
        the rows of item i (``num_rows[i]`` of them, in order) use ``adapters[i]``."""
        needed = {a.uid: a for a in adapters if a is not None}
        assert len(needed) <= self.max_loras, "the scheduler admits at most max_loras adapters"
        for uid, adapter in needed.items():
            if uid in self.slots:
                self.slots.move_to_end(uid)
                continue
            if len(self.slots) < self.max_loras:
                slot = len(self.slots)
            else:
                victim = next(u for u in self.slots if u not in needed)
                slot = self.slots.pop(victim)
            for name, layer in self.layers.items():
                layer.load(slot, adapter.pieces.get(name, []))
            self.slots[uid] = slot
            self.slot_loads += 1
        self.item_slots = [self.slots[a.uid] if a is not None else -1 for a in adapters]
        self.batch = LoRABatch.build(self.item_slots, num_rows, device)
