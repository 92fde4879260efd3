"""Runs ScheduledSteps: one flat batch through the model, then sampling and the features' outputs.

The runner knows requests only through the steps (`input_batch.py` keeps its own state of each), so it may live
in another process than the scheduler (`executor.py`). Only requests that reach the end of their known tokens this
step are sampled; a prefill chunk that stops short computes KV and nothing else. A request verifying drafts samples
at each of its 1 + k positions through the rejection sampler and gets 1 to k + 1 tokens. Features add their forward
inputs and act on the hidden states through their runner hooks (a pooling request's hidden states are pooled
there); once a step's tokens reach the host the hooks see them (the proposer drafts from them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.attention.kv_quant import all_scales_one, is_fp8, kv_cache_dtype
from loomserve.platform.config import EngineConfig
from loomserve.platform.cuda_graphs import CudaGraphRunner, graph_output_bytes
from loomserve.platform.distributed.parallel_state import kv_heads_per_rank
from loomserve.platform.features import RunnerHook, feature_off, find_hook, runner_hooks
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.input_batch import BatchInputs, InputBatch
from loomserve.platform.kv_cache.manager import cdiv, kv_block_bytes
from loomserve.platform.loader import load_model
from loomserve.platform.prompt_logprobs import PromptLogprobsCollector
from loomserve.platform.request import resolve_num_logprobs
from loomserve.platform.sampler import Sampler, SamplerOutput, build_sampling_metadata
from loomserve.platform.spec_decode.rejection_sampler import RejectionSampler, verify_rows
from loomserve.platform.step import ScheduledStep, StepResult
from loomserve.platform.structured.bitmask import FEATURE as STRUCTURED
from loomserve.platform.structured.bitmask import apply_structured_bitmask
from loomserve.platform.threads import StepThreads

logger = logging.getLogger(__name__)

_CPU_KV_DEFAULT_BYTES = 4 << 30
_NO_TOKENS = torch.zeros(0, dtype=torch.long)  # what a step samples when only pooling requests reach their end
_NO_SAMPLES = SamplerOutput(_NO_TOKENS, None, None, None)


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens and pooled outputs are on their way to the host."""

    request_ids: list[str]  # of the requests that sample
    sampled: torch.Tensor  # [N] int64 per sampling row (one per request, 1 + k verifying k drafts), on the host
    num_emitted: torch.Tensor | None  # [S] tokens each request keeps of its rows; None: one row, one token each
    num_drafts: list[int]  # per request: its rows are 1 + this many
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # host copies of the sampler's
    logprob_counts: list[int | None]  # per row: how many top logprobs it asked for
    pooled: dict[str, torch.Tensor]  # request id -> pooled output (float32), on the host once `done` has fired
    features: dict[str, Any]  # feature name -> its runner hook's result
    done: torch.cuda.Event | None  # fires when the copies have landed (CUDA only)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.device = mc.device
        self.block_size = config.cache_config.block_size
        torch.manual_seed(mc.seed)
        self.model = load_model(mc, config.attention_backend)
        self.hooks: list[RunnerHook] = runner_hooks(config, self.model, self.device)
        self.vocab_size = mc.vocab_size
        self.sampler = Sampler()
        self.prompt_logprobs = PromptLogprobsCollector(self.vocab_size)
        spec = config.speculative_config
        self.rejection_sampler = RejectionSampler(spec.synthetic_acceptance_rate if spec is not None else None)
        self.uses_kv_cache = not self.model.encoder_only  # encoder-only models keep no KV
        self.num_kv_heads = kv_heads_per_rank(mc.num_kv_heads, config.parallel_config.tensor_parallel_size)
        self.input_batch = InputBatch(config.scheduler_config.max_num_seqs, mc.max_model_len, self.block_size,
                                      self.device, config.scheduler_config.num_lookahead_tokens, self.uses_kv_cache)
        self.kv_caches: list[torch.Tensor] = []
        self.kv_dtype = kv_cache_dtype(config.cache_config.cache_dtype, mc.dtype)
        self.calculate_kv_scales = config.cache_config.calculate_kv_scales  # until the first step has run
        self.cuda_graphs: CudaGraphRunner | None = None
        self.step_threads = StepThreads(torch.get_num_threads()) if self.device.type == "cpu" else None

    def hook(self, name: str) -> RunnerHook | None:
        return find_hook(self.hooks, name)

    def measure_kv_blocks(self) -> int:
        """How many KV blocks fit: given, or what the memory budget leaves after a profile of the largest step."""
        cc = self.config.cache_config
        if not self.uses_kv_cache:  # nothing is allocated from them: enough for every sequence at full length
            mc, sc = self.config.model_config, self.config.scheduler_config
            return sc.max_num_seqs * cdiv(mc.max_model_len, self.block_size)
        if cc.num_gpu_blocks_override:
            return cc.num_gpu_blocks_override
        if cc.kv_cache_memory:
            return cc.kv_cache_memory // self._bytes_per_block()
        if self.device.type == "cuda":
            return self._profile_cuda_blocks()
        mc, sc = self.config.model_config, self.config.scheduler_config
        most_ever_used = sc.max_num_seqs * cdiv(mc.max_model_len, self.block_size)
        return min(_CPU_KV_DEFAULT_BYTES // self._bytes_per_block(), most_ever_used)

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache of `num_blocks` blocks per layer, then capture the CUDA graphs over it."""
        mc = self.config.model_config
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        num_cache_layers = mc.num_layers if self.uses_kv_cache else 0
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(num_cache_layers)]
        for hook in self.hooks:
            hook.register_kv_caches(self.kv_caches)
            hook.init_kv_cache(num_blocks)
        self.cuda_graphs = self._capture_cuda_graphs()
        if is_fp8(self.kv_dtype) and not self.calculate_kv_scales and all_scales_one(self.model):
            logger.warning("fp8 KV cache with scales 1.0 (the checkpoint has none): keys and values beyond the "
                           "float8 range saturate; --calculate-kv-scales takes scales from the first step")
        if not self.uses_kv_cache:
            logger.info("%s: no KV cache (an encoder: every prompt runs whole in one step)", mc.served_model_name)
            return
        logger.info(
            "%s: KV cache of %d blocks of %d tokens (%d tokens, %.1f MiB, %s) on %s", mc.served_model_name,
            num_blocks, self.block_size, num_blocks * self.block_size,
            num_blocks * self._bytes_per_block() / 2**20, str(self.kv_dtype).removeprefix("torch."), self.device,
        )

    def _uses_cuda_graphs(self) -> bool:
        # The torch reference backend reads host-side lengths, which a graph would freeze: Triton only. Graphs
        # yield logits or hidden states for sampling; pooling steps always run eagerly, so a pooling model has none.
        # Expert parallelism sizes its all-to-all exchanges on the host each step: eager only.
        # An encoder-decoder's cross-attention reads per-request tensors of the step: eager too.
        return (self.device.type == "cuda" and not self.config.enforce_eager and not self.model.is_encoder_decoder
                and not self.config.parallel_config.enable_expert_parallel
                and self.config.attention_backend == "triton" and self.config.model_config.task == "generate")

    def _capture_cuda_graphs(self) -> CudaGraphRunner | None:
        if not self._uses_cuda_graphs():
            return None
        mc = self.config.model_config
        return CudaGraphRunner(self.model, self.kv_caches, self.config.scheduler_config.max_num_seqs,
                               mc.max_model_len, self.block_size, self.config.max_cudagraph_capture_size,
                               self._for_graph)

    def _for_graph(self, batch: ForwardBatch) -> None:
        for hook in self.hooks:
            hook.for_graph(batch)

    def _graph_memory(self) -> int:
        """Bytes the CUDA graphs will keep, captured after the KV cache takes its share."""
        if not self._uses_cuda_graphs():
            return 0
        mc = self.config.model_config
        return graph_output_bytes(self.config.scheduler_config.max_num_seqs, self.config.max_cudagraph_capture_size,
                                  mc.vocab_size, mc.text_config.hidden_size, mc.dtype.itemsize)

    def _bytes_per_block(self) -> int:
        if not self.uses_kv_cache:
            return 0
        features = sum(hook.kv_bytes_per_block() for hook in self.hooks)
        return kv_block_bytes(self.config.model_config, self.config.cache_config, self.num_kv_heads) + features

    def _profile_cuda_blocks(self) -> int:
        """Run the largest step once to measure peak activation memory; the KV cache gets what is left."""
        mc, sc = self.config.model_config, self.config.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, mc.max_model_len)
        num_blocks = cdiv(num_tokens, self.block_size)
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(mc.num_layers)]
        torch.cuda.reset_peak_memory_stats()
        attn = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None],
            seq_counts=torch.tensor([0, 1], device=self.device),
            num_decodes=0,
            num_decode_tokens=0,
            query_start_loc_cpu=[0, num_tokens],
            seq_lens_cpu=[num_tokens],
        )
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        forward = ForwardBatch(attn, torch.arange(num_tokens, device=self.device))
        for hook in self.hooks:
            hook.for_profile(forward)
        hidden = self.model(ids, caches, forward)
        if mc.task == "generate":  # pooling models have no LM head
            self.model.compute_logits(hidden[: min(sc.max_num_seqs, num_tokens)])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del caches, hidden
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info()
        budget = total * self.config.cache_config.gpu_memory_utilization - peak - self._graph_memory()
        if budget <= 0:
            raise ValueError(f"no GPU memory left for the KV cache (peak use {peak / 2**30:.1f} GiB)")
        return int(budget // self._bytes_per_block())

    def call(self, feature: str, method: str, *args: Any) -> Any:
        """An engine call to a feature's runner hook; ValueError when the feature is off or refuses."""
        hook = self.hook(feature)
        if hook is None:
            raise feature_off(feature)
        return hook.call(method, *args)

    @torch.inference_mode()
    def launch(self, step: ScheduledStep, before_sample: Callable[[], None] | None = None) -> InFlightStep:
        """Take in the step's diff, then run its model, sampler and features without waiting for them;
        `before_sample` (the engine's, in process) runs while the forward does and may add to `step.features`."""
        forgotten = self.input_batch.apply(step)
        self.prompt_logprobs.release(forgotten)
        self.prompt_logprobs.admit(step.new_requests)
        if self.step_threads is not None:
            self.step_threads.for_step(step.num_tokens)
        for hook in self.hooks:
            if forgotten:
                hook.release(forgotten)
            hook.begin_step(step)
        logits, pooled, batch = None, {}, None
        if step.scheduled:
            batch = self.input_batch.prepare(step)
            if self.calculate_kv_scales:  # the first step's keys and values set the fp8 scales (eagerly)
                batch.forward.attn.calculate_kv_scales, self.calculate_kv_scales = True, False
            for hook in self.hooks:
                hook.prepare(step, batch)
            logits, pooled = self._run_model(batch)
        features = {h.name: r for h in self.hooks if (r := h.result()) is not None}
        rows = batch.sample_requests if batch is not None else []
        ids = [r.request_id for r in rows]
        counts = [resolve_num_logprobs(r.sampling_params.logprobs, self.vocab_size) for r in rows]
        num_drafts = [len(d) for d in batch.drafts] if batch is not None else []
        if logits is not None and before_sample is not None:
            before_sample()
        if logits is not None:
            apply_structured_bitmask(logits, step.features.get(STRUCTURED), batch)
        result, num_emitted = (_NO_SAMPLES, None) if logits is None else self._sample(batch, logits)
        sampled = result.sampled_token_ids
        logprobs = None if result.logprobs is None else (
            result.logprob_token_ids, result.logprobs, result.sampled_token_ranks)
        if self.device.type != "cuda":
            self._after_sample(batch, sampled)
            return InFlightStep(ids, sampled, num_emitted, num_drafts, logprobs, counts, pooled, features, None)
        emitted = () if num_emitted is None else (num_emitted,)
        host = [t.to("cpu", non_blocking=True) for t in (sampled, *emitted, *(logprobs or ()))]
        pooled = pooled_to_host(pooled)
        done = torch.cuda.Event()
        done.record()
        self._after_sample(batch, result.sampled_token_ids)
        sampled, num_emitted = host[0], (host[1] if emitted else None)
        logprobs = tuple(host[1 + len(emitted):]) if logprobs else None
        return InFlightStep(ids, sampled, num_emitted, num_drafts, logprobs, counts, pooled, features, done)

    def _after_sample(self, batch: BatchInputs | None, sampled: torch.Tensor) -> None:
        if batch is not None:
            for hook in self.hooks:
                hook.after_sample(batch, sampled)

    def _sample(self, batch: BatchInputs, logits: torch.Tensor) -> tuple[SamplerOutput, torch.Tensor | None]:
        """The sampling rows' tokens (and logprobs where asked for); with drafts to verify, also how many tokens
        each request keeps [S]. Without drafts the tokens [S] are kept for the next step's tokens in flight (a step
        that verifies drafts lands before the next is scheduled)."""
        if batch.spec is not None:
            rows = verify_rows(batch.sample_requests, batch.drafts)
            meta = build_sampling_metadata(rows, self.vocab_size, self.device)
            result, num_emitted = self.rejection_sampler(logits, meta, batch.spec)
            self.input_batch.keep_sampled(_NO_TOKENS, [])
            return result, num_emitted
        meta = build_sampling_metadata(batch.sample_requests, self.vocab_size, self.device)
        result = self.sampler(logits, meta)
        self.input_batch.keep_sampled(result.sampled_token_ids, batch.sample_requests)
        return result, None

    def collect(self, step: InFlightStep) -> StepResult:
        """Wait for a launched step's tokens (and logprobs) and pooled outputs, and hand them out by request."""
        if step.done is not None:
            step.done.synchronize()
        tokens = step.sampled.tolist()
        emitted = [1] * len(tokens) if step.num_emitted is None else step.num_emitted.tolist()
        starts = np.cumsum([0] + [k + 1 for k in step.num_drafts]).tolist()  # each request's first row
        sampled = {request_id: tokens[start : start + n]
                   for request_id, start, n in zip(step.request_ids, starts, emitted)}
        logprobs = {}
        if step.logprobs is not None:
            rows = list(zip(*(t.tolist() for t in step.logprobs)))
            for request_id, k, start, n in zip(step.request_ids, step.logprob_counts, starts, emitted):
                if k is not None:
                    logprobs[request_id] = [(tok[: k + 1], lp[: k + 1], rank)
                                            for tok, lp, rank in rows[start : start + n]]
        self.input_batch.land(sampled)
        features = dict(step.features)
        for hook in self.hooks:
            landed = hook.land(sampled)
            if landed is not None:
                features[hook.name] = landed
        return StepResult(sampled, logprobs, step.pooled, features, self.prompt_logprobs.take(step.request_ids))

    def _run_model(self, batch: BatchInputs) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Logits of the sampling rows [S, vocab] (None when no row samples) and the pooled outputs (on the device).

        A decode-only batch replays a decode CUDA graph (logits), another batch within the mixed graphs' sizes a mixed
        graph (hidden states). Graphs take token ids and positions only (their LoRA batch comes from the slots the LoRA
        manager wrote), so a step with extra model inputs (media embeddings, token types) or a pooling request runs
        eagerly."""
        graphs, forward = self.cuda_graphs, batch.forward
        num_tokens, num_seqs = batch.input_ids.shape[0], forward.attn.num_seqs
        replayable = graphs is not None and not (batch.pooling or forward.has_extra_inputs
                                                 or forward.attn.calculate_kv_scales)
        # The decode graph yields logits only; a one-token prompt chunk whose logprobs are asked for needs hidden states
        decode_graph = replayable and not self.prompt_logprobs.collecting
        if decode_graph and forward.attn.num_decodes == num_seqs and graphs.can_run_decode(num_seqs):
            logits = graphs.run_decode(batch.input_ids, forward)  # [B, vocab]
            return (logits[batch.logits_indices] if batch.sample_requests else None), {}
        if replayable and graphs.can_run_mixed(num_tokens, num_seqs):
            hidden = graphs.run_mixed(batch.input_ids, forward)  # [T, hidden]
        else:
            hidden = self.model(batch.input_ids, self.kv_caches, forward)
        self.prompt_logprobs.add(self.model, hidden, batch)
        logits = self.model.compute_logits(hidden[batch.logits_indices]) if batch.sample_requests else None
        pooled = {}
        for hook in self.hooks:
            pooled.update(hook.pool(hidden, batch))
        return logits, pooled


def pooled_to_host(pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's pooled outputs in one device-to-host copy (a copy per request made a step of a thousand sentences
    launch-bound); each request's output is a view of the pinned host buffer, filled once the step's event fires."""
    if not pooled:
        return {}
    flat = torch.cat([t.reshape(-1) for t in pooled.values()])  # [sum of the outputs' sizes] float32
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    views = host.split([t.numel() for t in pooled.values()])
    return {request_id: v.view(t.shape) for (request_id, t), v in zip(pooled.items(), views)}
