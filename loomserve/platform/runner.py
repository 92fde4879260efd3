"""Turns a SchedulerOutput into one flat batch, runs the model, and samples the next tokens or pools.

The batch has no padding: every scheduled request contributes its new tokens, decodes first so the
attention backend can treat them together. Only requests that reach the end of their known tokens
this step are sampled; a prefill chunk that stops short computes KV and nothing else. A pooling
request whose prompt ends this step has its hidden states pooled instead of sampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.block_table import BlockTable
from loomserve.platform.config import EngineConfig
from loomserve.platform.cuda_graphs import CudaGraphRunner, graph_output_bytes
from loomserve.platform.forward_batch import ForwardBatch
from loomserve.platform.kv_cache.manager import cdiv
from loomserve.platform.loader import load_model
from loomserve.platform.multimodal_runner import MultiModalRunner
from loomserve.platform.request import Request
from loomserve.platform.sampler import Sampler, build_sampling_metadata
from loomserve.platform.scheduler import ScheduledRequest, SchedulerOutput
from loomserve.pooling.batch import PoolingSpan, token_type_ids
from loomserve.pooling.poolers import Pooler

logger = logging.getLogger(__name__)

_CPU_KV_DEFAULT_BYTES = 4 << 30
_NO_TOKENS = torch.zeros(0, dtype=torch.long)  # what a step samples when only pooling requests reach their end


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [T] int64
    forward: ForwardBatch  # the model's per-step argument: attention metadata, positions, LoRA batch, extra inputs
    logits_indices: torch.Tensor  # [S] int64: the last token of each request that samples
    sample_requests: list[Request]
    pooling: list[PoolingSpan] = field(default_factory=list)  # the requests whose prompt ends this step and pools


@dataclass
class InFlightStep:
    """A launched step whose sampled tokens and pooled outputs are on their way to the host."""

    request_ids: list[str]  # of the rows that sample
    sampled: torch.Tensor  # [S] int64, on the host once `done` has fired
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # host copies of the sampler's
    logprob_counts: list[int | None]  # per row: how many top logprobs it asked for
    pooled: dict[str, torch.Tensor]  # request id -> pooled output (float32), on the host once `done` has fired
    done: torch.cuda.Event | None  # fires when the copies have landed (CUDA only)


@dataclass
class StepOutput:
    sampled: dict[str, int]  # request id -> new token
    # request id -> (token ids, logprobs, rank of the sampled token): sampled token first, then the top-k
    logprobs: dict[str, tuple[list[int], list[float], int]]
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # request id -> pooled output (float32, CPU)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.device = mc.device
        self.block_size = config.cache_config.block_size
        torch.manual_seed(mc.seed)
        self.model = load_model(mc, config.attention_backend)
        self.mm = MultiModalRunner(self.model, self.device) if getattr(self.model, "is_multimodal", False) else None
        self.lora_manager = None
        if config.lora_config is not None:
            from loomserve.adapters.manager import LoRAManager

            self.lora_manager = LoRAManager(self.model, config.lora_config, self.device, self._max_graph_tokens())
        self.vocab_size = mc.vocab_size
        self.sampler = Sampler()
        self.pooler = Pooler(self.model, mc.pooler_config)
        self.uses_kv_cache = getattr(self.model, "uses_kv_cache", True)  # encoder-only models keep no KV
        num_blocks = self._num_kv_blocks()
        config.cache_config.num_blocks = num_blocks
        if num_blocks * self.block_size < mc.max_model_len:
            raise ValueError(
                f"max_model_len {mc.max_model_len} is larger than the {num_blocks * self.block_size} tokens the "
                "KV cache can hold: give it more memory (--kv-cache-memory, --gpu-memory-utilization) or "
                "lower --max-model-len"
            )
        shape = (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        num_cache_layers = mc.num_layers if self.uses_kv_cache else 0
        self.kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device) for _ in range(num_cache_layers)]
        self.block_table = BlockTable(config.scheduler_config.max_num_seqs, cdiv(mc.max_model_len, self.block_size))
        self.cuda_graphs = self._capture_cuda_graphs()
        self.previous_sampled = torch.zeros(0, dtype=torch.long, device=self.device)  # [S] last launch's tokens
        self.previous_rows: dict[str, int] = {}  # request id -> its row in previous_sampled
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB) on %s",
            num_blocks, self.block_size, num_blocks * self.block_size,
            num_blocks * self._bytes_per_block() / 2**30, self.device,
        )

    def _uses_cuda_graphs(self) -> bool:
        # The torch reference backend reads host-side lengths, which a graph would freeze: Triton only. Graphs
        # yield logits or hidden states for sampling; pooling steps always run eagerly, so a pooling model has none.
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and self.config.attention_backend == "triton" and self.config.model_config.task == "generate")

    def _capture_cuda_graphs(self) -> CudaGraphRunner | None:
        if not self._uses_cuda_graphs():
            return None
        mc = self.config.model_config
        lora_for_graph = self.lora_manager.graph_batch if self.lora_manager is not None else None
        return CudaGraphRunner(self.model, self.kv_caches, self.config.scheduler_config.max_num_seqs,
                               mc.max_model_len, self.block_size, self.config.max_cudagraph_capture_size,
                               lora_for_graph)

    def _graph_memory(self) -> int:
        """Bytes the CUDA graphs will keep, captured after the KV cache takes its share."""
        if not self._uses_cuda_graphs():
            return 0
        mc = self.config.model_config
        return graph_output_bytes(self.config.scheduler_config.max_num_seqs, self.config.max_cudagraph_capture_size,
                                  mc.vocab_size, mc.text_config.hidden_size, mc.dtype.itemsize)

    def _max_graph_tokens(self) -> int:
        """The most tokens a CUDA-graph step may hold (what graph-side buffers are sized by)."""
        return max(self.config.scheduler_config.max_num_seqs, self.config.max_cudagraph_capture_size)

    def _bytes_per_block(self) -> int:
        if not self.uses_kv_cache:
            return 0
        mc = self.config.model_config
        itemsize = torch.empty((), dtype=mc.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * itemsize

    def _num_kv_blocks(self) -> int:
        cc = self.config.cache_config
        if not self.uses_kv_cache:  # block tables as bookkeeping only, enough for every sequence at full length
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

    def _profile_cuda_blocks(self) -> int:
        """Run the largest step once to measure peak activation memory; the KV cache gets what is left."""
        mc, sc = self.config.model_config, self.config.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, mc.max_model_len)
        num_blocks = cdiv(num_tokens, self.block_size)
        shape = (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device) for _ in range(mc.num_layers)]
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
        hidden = self.model(ids, caches, ForwardBatch(attn, torch.arange(num_tokens, device=self.device)))
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

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> BatchInputs:
        """Pack the step's tokens; `scheduled` must list single-token (decode) requests first.

        Everything the device needs goes over in one int64 host buffer and one copy.
        """
        bs = self.block_size
        num_decodes = 0
        while num_decodes < len(scheduled) and scheduled[num_decodes].num_new_tokens == 1:
            num_decodes += 1
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens = []
        logits_indices = []
        sample_requests = []
        pooling = []
        rows = []
        from_previous: list[tuple[int, int]] = []  # (batch position, previous step's row): tokens in flight
        for s in scheduled:
            request, start, n = s.request, s.start, s.num_new_tokens
            end = start + n
            rows.append(self.block_table.sync(request.request_id, s.block_ids))
            if n == 1:  # the decode hot path: scalars only
                if start < request.num_tokens:
                    ids.append(_token_at(request, start))
                else:
                    from_previous.append((len(ids), self.previous_rows[request.request_id]))
                    ids.append(0)
                positions.append(start)
                slots.append(s.block_ids[start // bs] * bs + start % bs)
            else:
                ids.extend(request.all_token_ids[start:end])
                pos = np.arange(start, end)
                table = np.asarray(s.block_ids[: cdiv(end, bs)], dtype=np.int64)
                positions.extend(pos.tolist())
                slots.extend((table[pos // bs] * bs + pos % bs).tolist())
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            if s.samples:
                logits_indices.append(query_start_loc[-1] - 1)
                sample_requests.append(request)
            elif s.pools:
                pooling.append(PoolingSpan.of(request, query_start_loc[-2], query_start_loc[-1]))
        width = cdiv(max(seq_lens), bs)
        num_tokens, num_seqs = len(ids), len(scheduled)
        at, prev = (list(x) for x in zip(*from_previous)) if from_previous else ([], [])
        counts = [num_decodes, num_seqs]
        host = np.concatenate([
            np.array(ids + positions + slots + query_start_loc + seq_lens + counts + logits_indices + at + prev,
                     dtype=np.int64),
            self.block_table.gather(rows, width).ravel(),
        ])
        # One non-blocking copy: a blocking one would first wait for the step still running on the GPU.
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, 2, len(logits_indices), len(at), len(prev)]
        parts = torch.tensor_split(dev, np.cumsum(sizes).tolist())
        input_ids, pos_t, slot_t, qsl_t, seq_lens_t, counts_t, logits_t, at_t, prev_t, tables_t = parts
        attn = AttentionMetadata(
            slot_mapping=slot_t,
            query_start_loc=qsl_t,
            seq_lens=seq_lens_t,
            block_tables=tables_t.view(num_seqs, width),
            seq_counts=counts_t,
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        if from_previous:  # fill in tokens that exist only on the device so far
            input_ids[at_t] = self.previous_sampled[prev_t]
        forward = ForwardBatch(attn, pos_t, token_type_ids=token_type_ids(pooling, num_tokens, self.device))
        return BatchInputs(input_ids, forward, logits_t, sample_requests, pooling)

    def release(self, request_ids: list[str]) -> None:
        """Forget the block-table rows of requests that finished, were aborted or were preempted."""
        for request_id in request_ids:
            self.block_table.release(request_id)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> InFlightStep | None:
        """Run the step's model, sampler and pooler without waiting for them; None when nothing samples or pools."""
        scheduled = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)
        batch = self.prepare_inputs(scheduled)
        if self.mm is not None:
            self.mm.prepare(out, scheduled, batch)
        if self.lora_manager is not None:
            batch.forward.lora = self.lora_manager.prepare(scheduled, out.active_loras)
        logits, pooled = self._run_model(batch)
        if logits is None and not pooled:
            return None
        ids = [r.request_id for r in batch.sample_requests]
        counts = [r.sampling_params.logprobs for r in batch.sample_requests]
        sampled, logprobs = (_NO_TOKENS, None) if logits is None else self._sample(batch, logits)
        if self.device.type != "cuda":
            return InFlightStep(ids, sampled, logprobs, counts, pooled, None)
        host = [t.to("cpu", non_blocking=True) for t in (sampled, *(logprobs or ()))]
        pooled = {request_id: t.to("cpu", non_blocking=True) for request_id, t in pooled.items()}
        done = torch.cuda.Event()
        done.record()
        return InFlightStep(ids, host[0], tuple(host[1:]) if logprobs else None, counts, pooled, done)

    def _sample(
        self, batch: BatchInputs, logits: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """The sampling rows' next tokens [S] (and logprobs where asked for), kept for the next step's tokens in
        flight."""
        meta = build_sampling_metadata(batch.sample_requests, self.vocab_size, self.device)
        result = self.sampler(logits, meta)
        self.previous_sampled = result.sampled_token_ids
        self.previous_rows = {r.request_id: i for i, r in enumerate(batch.sample_requests)}
        if result.logprobs is None:
            return result.sampled_token_ids, None
        return result.sampled_token_ids, (result.logprob_token_ids, result.logprobs, result.sampled_token_ranks)

    def collect(self, step: InFlightStep | None) -> StepOutput:
        """Wait for a launched step's tokens (and logprobs) and pooled outputs, and hand them out by request."""
        if step is None:
            return StepOutput({}, {})
        if step.done is not None:
            step.done.synchronize()
        sampled = dict(zip(step.request_ids, step.sampled.tolist()))
        logprobs = {}
        if step.logprobs is not None:
            rows = zip(*(t.tolist() for t in step.logprobs))
            for request_id, k, (tok, lp, rank) in zip(step.request_ids, step.logprob_counts, rows):
                if k is not None:
                    logprobs[request_id] = (tok[: k + 1], lp[: k + 1], rank)
        return StepOutput(sampled, logprobs, step.pooled)

    def _run_model(self, batch: BatchInputs) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Logits of the sampling rows [S, vocab] (None when no row samples) and the pooled outputs (on the device).

        A decode-only batch replays a decode CUDA graph (logits), another batch within the mixed graphs' sizes a mixed
        graph (hidden states). Graphs take token ids and positions only (their LoRA batch comes from the slots the LoRA
        manager wrote), so a step with extra model inputs (media embeddings, token types) or a pooling request runs
        eagerly."""
        graphs, forward = self.cuda_graphs, batch.forward
        num_tokens, num_seqs = batch.input_ids.shape[0], forward.attn.num_seqs
        replayable = graphs is not None and not (batch.pooling or forward.has_extra_inputs)
        if replayable and forward.attn.num_decodes == num_seqs and graphs.can_run_decode(num_seqs):
            logits = graphs.run_decode(batch.input_ids, forward)  # [B, vocab]
            return (logits[batch.logits_indices] if batch.sample_requests else None), {}
        if replayable and graphs.can_run_mixed(num_tokens, num_seqs):
            hidden = graphs.run_mixed(batch.input_ids, forward)  # [T, hidden]
        else:
            hidden = self.model(batch.input_ids, self.kv_caches, forward)
        logits = self.model.compute_logits(hidden[batch.logits_indices]) if batch.sample_requests else None
        return logits, self.pooler(hidden, batch.pooling)


def _token_at(request: Request, position: int) -> int:
    """One token without building the whole token list (the decode hot path)."""
    n = request.num_prompt_tokens
    return request.prompt_token_ids[position] if position < n else request.output_token_ids[position - n]

