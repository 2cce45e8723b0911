"""PURE's collection: spatial means of the cross-attention output at every ``attn2``.

A processor installed on every ``attn2`` module computes the attention exactly as diffusers'
``AttnProcessor2_0`` does and, when recording, keeps ``mean_N softmax(QK^T/sqrt(d)) V`` (before ``to_out``)
for the conditional rows of the CFG batch. The op is ``ops.pooled_attention`` (fused Triton kernel on CUDA,
SDPA + mean otherwise). Originals are restored afterwards, even on error.

Rows are grouped (forget concept i, retain, ...). Each group keeps its rows until it holds more rows than
the layer width d, then switches to the streamed Gram matrix ``H^T H`` (d x d), so memory stays bounded
however many anchors stream in.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..adapters.base import CrossAttnLayer, ModelAdapter
from ..errors import UsageError
from ..ops.pooled_attention import pooled_attention
from ..options import option
from . import compiled


# ---- options --------------------------------------------------------------------------------------------
@dataclass
class CollectOptions:
    """How the short denoising trajectory for collection is run (defaults chosen on the toy world).

    steps: length of the DDIM schedule. record_steps: how many of its first (noisiest) steps are run and
    recorded (None = all). seeds: initial noises per anchor prompt. size: resolution in pixels (None = the
    adapter's collection default). guidance_scale: CFG scale of the trajectory (None = model default).
    batch_size: samples (prompt x seed) per UNet call. max_rows: a group switches from rows to a streamed
    Gram matrix once it holds more rows than this (None = the layer width).
    """

    steps: int = option(10, help="collection schedule length", range=(1, 1000, "[]"))
    record_steps: int | None = option(5, help="recorded (first) steps of the schedule", range=(1, 1000, "[]"))
    seeds: tuple[int, ...] = option(help="collection seed(s) (repeatable)", flag="--seed",
                                    default_factory=lambda: (0, 1))
    size: int | None = option(None, help="collection resolution in pixels", range=(8, 4096, "[]"),
                              use="[8, 4096] pixels")
    guidance_scale: float | None = option(None, help="collection CFG scale", range=(0, 100, "[]"), flag="--guidance")
    scheduler: str | None = option("ddim", help="sampler of the collection trajectory", flag=False)
    batch_size: int = option(16, help="samples per UNet call (lower it to save memory)", range=(1, math.inf, "[)"))
    max_rows: int | None = option(None, help="rows a group keeps before it streams a Gram matrix (None: the layer "
                                  "width)", range=(1, math.inf, "[)"), flag=False)

    def check(self) -> None:
        """Rules across fields (the ranges are checked from the field metadata, ``options.validate_options``)."""
        if self.record_steps is not None and not (1 <= self.record_steps <= self.steps):
            raise UsageError(f"record_steps={self.record_steps!r} must be in [1, steps={self.steps}]")
        if not self.seeds:
            raise UsageError("seeds is empty; give at least one seed")
        bad = [s for s in self.seeds
               if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not -(2**63) <= int(s) < 2**64]
        if bad:
            raise UsageError(f"seed {bad[0]!r} is not an integer in [-2**63, 2**64) (torch's seed range)")

# ---- per-group statistics ---------------------------------------------------------------------------
@dataclass
class GroupStats:
    """Rows of one group at one layer ([n, d] fp32), or their Gram matrix H^T H once n exceeds max_rows."""

    d: int
    max_rows: int
    rows: list = field(default_factory=list)
    n_rows: int = 0
    gram: torch.Tensor | None = None
    row_sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.n_rows += x.shape[0]
        s = x.double().sum(0)
        self.row_sum = s if self.row_sum is None else self.row_sum + s
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
            return
        self.rows.append(x)
        if self.n_rows > self.max_rows:
            h = torch.cat(self.rows)
            self.gram = h.T @ h
            self.rows = []

    def matrix(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.d)

    def mean(self) -> torch.Tensor:
        if self.row_sum is None:
            return torch.zeros(self.d, dtype=torch.float64)
        return self.row_sum / max(self.n_rows, 1)

    @property
    def is_gram(self) -> bool:
        return self.gram is not None


class Recorder:
    """Shared state between the trajectory loop and the processors.

    ``groups`` (the group of each conditional row of the current batch) is set once per batch; its setter
    turns it into row spans ``(group, start, stop)``. Samples are laid out group by group, so every group is
    one contiguous run of rows and :meth:`record` slices (no index tensor: indexing a CUDA tensor with a
    Python list copies the index from pageable host memory, which synchronises the stream — once per layer
    per step per group, which would stall the GPU's run-ahead). A group split into several runs gets one
    span per run (same statistics: rows are summed and appended in order)."""

    def __init__(self, layers: Sequence[CrossAttnLayer], max_rows: int | None):
        self.layers = list(layers)
        self.max_rows = max_rows
        self.stats: dict[str, list[GroupStats]] = {}
        self.active = False
        self.cond_slice = slice(None)
        self._groups: list[str] = []
        self.spans: list[tuple[str, int, int]] = []
        # compiled collection (collect/compiled.py): processors store into one slot per layer, flush() adds
        self.deferred = False
        self.pending: list[torch.Tensor | None] = [None] * len(self.layers)

    @property
    def groups(self) -> list[str]:
        return self._groups

    @groups.setter
    def groups(self, groups: Sequence[str]) -> None:
        self._groups = list(groups)
        spans: list[tuple[str, int, int]] = []
        for i, g in enumerate(self._groups):
            if spans and spans[-1][0] == g and spans[-1][2] == i:
                spans[-1] = (g, spans[-1][1], i + 1)
            else:
                spans.append((g, i, i + 1))
        self.spans = spans

    def _group_stats(self, group: str) -> list[GroupStats]:
        if group not in self.stats:
            self.stats[group] = [GroupStats(l.d_out, self.max_rows or l.d_out) for l in self.layers]
        return self.stats[group]

    def record(self, layer_index: int, pooled: torch.Tensor) -> None:
        if not self.active:
            return
        if self.deferred:
            self.pending[layer_index] = pooled
            return
        self._add(layer_index, pooled)

    def flush(self, clone: bool = False) -> None:
        """Add the deferred slots to the statistics in layer order (``clone``: copy them first)."""
        for i, pooled in enumerate(self.pending):
            if pooled is not None:
                self.pending[i] = None
                self._add(i, pooled.clone() if clone else pooled)

    def _add(self, layer_index: int, pooled: torch.Tensor) -> None:
        rows = pooled[self.cond_slice]
        if len(self.spans) == 1:
            self._group_stats(self.spans[0][0])[layer_index].add(rows)
            return
        for g, start, stop in self.spans:
            self._group_stats(g)[layer_index].add(rows[start:stop])


class PooledCrossAttnProcessor:
    """AttnProcessor2_0's cross-attention, plus the spatial mean of the output before ``to_out``."""

    def __init__(self, layer_index: int, recorder: Recorder):
        self.layer_index = layer_index
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is None and self.recorder.active:
            out, pooled = pooled_attention(query, key, value)
            self.recorder.record(self.layer_index, pooled)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
            if self.recorder.active:
                self.recorder.record(self.layer_index, out.float().mean(2).reshape(batch_size, -1))
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def installed_processors(layers: Sequence[CrossAttnLayer], make):
    """Install ``make(i, layer)`` on every layer's module; restore the original processors on exit."""
    originals = [layer.module.processor for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.module.set_processor(make(i, layer))
        yield
    finally:
        for layer, proc in zip(layers, originals):
            layer.module.set_processor(proc)


def _maybe_compiled(adapter: ModelAdapter, recorder: Recorder):
    """The UNet compiled for the trajectory when ``PURE_FAST_COMPILE_COLLECT`` asks for it (collect/compiled.py)."""
    mode = compiled.compile_mode()
    return compiled.compiled_unet(adapter.unet, recorder, mode) if mode else contextlib.nullcontext()


# ---- the collection stage ---------------------------------------------------------------------------------
@dataclass
class Activations:
    """Per group, per layer statistics of pooled cross-attention outputs."""

    layers: list[CrossAttnLayer]
    stats: dict[str, list[GroupStats]]
    options: CollectOptions

    def groups(self) -> list[str]:
        return list(self.stats)

    def rows(self, group: str) -> int:
        return self.stats[group][0].n_rows


def collect_activations(
    adapter: ModelAdapter,
    prompt_groups: dict[str, Sequence[str]],
    options: CollectOptions | None = None,
    progress: bool = True,
) -> Activations:
    """Run the collection trajectory for every prompt of every group and return the pooled statistics.
    ``options`` are taken as validated (``options.validate_options``, run once where options are built).

    Inside a torch.distributed process group each rank runs a contiguous block of the batches and the
    statistics are merged on every rank (``pure_fast.distributed``: the single-process result)."""
    from .. import distributed

    opts = options or CollectOptions()
    layers = adapter.cross_attention_layers()
    recorder = Recorder(layers, opts.max_rows)
    samples = [(g, p, s) for g, prompts in prompt_groups.items() for p in prompts for s in opts.seeds]
    guidance = adapter.default_guidance if opts.guidance_scale is None else opts.guidance_scale
    size = opts.size or adapter.default_collect_size
    n_steps = opts.steps if opts.record_steps is None else opts.record_steps
    starts = range(0, len(samples), opts.batch_size)
    mine = distributed.split([len(samples[s : s + opts.batch_size]) for s in starts], "collect")
    with torch.no_grad(), installed_processors(layers, lambda i, l: PooledCrossAttnProcessor(i, recorder)), \
            _maybe_compiled(adapter, recorder), \
            distributed.progress_bar(total=len(starts) * n_steps, desc="collect", enabled=progress, unit="step") as bar, \
            distributed.stage("collect"):

        def on_step(i, t):  # before each UNet call: the bar counts denoising steps
            recorder.active = True
            bar.update(1)

        for start in (starts[b] for b in mine):
            chunk = samples[start : start + opts.batch_size]
            unique_prompts = list(dict.fromkeys(p for _, p, _ in chunk))
            enc = adapter.encode(unique_prompts)
            cond = enc.index([unique_prompts.index(p) for _, p, _ in chunk])
            recorder.groups = [g for g, _, _ in chunk]
            recorder.cond_slice = slice(len(chunk), None) if guidance > 1.0 else slice(None)
            recorder.active = False
            adapter.denoise(
                cond, [s for _, _, s in chunk], steps=opts.steps, size=size, guidance_scale=guidance,
                scheduler=opts.scheduler, max_steps=n_steps, on_step=on_step,
            )
            recorder.active = False
    # groups with no prompts still get (empty) statistics
    for g in prompt_groups:
        recorder._group_stats(g)
    order = list(dict.fromkeys([g for g, _, _ in samples] + list(prompt_groups)))
    stats = distributed.merge_group_stats(recorder.stats, order, adapter.device)
    return Activations(layers, stats, opts)
