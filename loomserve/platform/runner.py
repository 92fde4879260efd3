"""Turns a SchedulerOutput into one flat batch, runs the model, and samples the next tokens.

The batch has no padding: every scheduled request contributes its new tokens, decodes first so the
attention backend can treat them together. Only requests that reach the end of their known tokens
this step are sampled; a prefill chunk that stops short computes KV and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from loomserve.platform.attention import AttentionMetadata
from loomserve.platform.config import EngineConfig
from loomserve.platform.kv_cache.manager import cdiv
from loomserve.platform.loader import load_model
from loomserve.platform.request import Request
from loomserve.platform.sampler import Sampler, build_sampling_metadata
from loomserve.platform.scheduler import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from loomserve.adapters.layers import LoRABatch

logger = logging.getLogger(__name__)

_CPU_KV_DEFAULT_BYTES = 4 << 30


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: the last token of each request that samples
    sample_requests: list[Request]
    lora: LoRABatch | None = None  # each token's adapter slot (lora_slots [T]); None: no adapter this step


@dataclass
class StepOutput:
    sampled: dict[str, int]  # request id -> new token
    # request id -> (token ids, logprobs, rank of the sampled token): sampled token first, then the top-k
    logprobs: dict[str, tuple[list[int], list[float], int]]


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.device = mc.device
        self.block_size = config.cache_config.block_size
        torch.manual_seed(mc.seed)
        self.model = load_model(mc, config.attention_backend)
        self.lora_manager = None
        if config.lora_config is not None:
            from loomserve.adapters.manager import LoRAManager

            self.lora_manager = LoRAManager(self.model, config.lora_config, self.device)
        self.vocab_size = mc.vocab_size
        self.sampler = Sampler()
        num_blocks = self._num_kv_blocks()
        config.cache_config.num_blocks = num_blocks
        if num_blocks * self.block_size < mc.max_model_len:
            raise ValueError(
                f"max_model_len {mc.max_model_len} is larger than the {num_blocks * self.block_size} tokens the "
                "KV cache can hold: give it more memory (--kv-cache-memory, --gpu-memory-utilization) or "
                "lower --max-model-len"
            )
        shape = (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device) for _ in range(mc.num_layers)]
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB) on %s",
            num_blocks, self.block_size, num_blocks * self.block_size,
            num_blocks * self._bytes_per_block() / 2**30, self.device,
        )

    def _bytes_per_block(self) -> int:
        mc = self.config.model_config
        itemsize = torch.empty((), dtype=mc.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * itemsize

    def _num_kv_blocks(self) -> int:
        cc = self.config.cache_config
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
            num_decodes=0,
            num_decode_tokens=0,
            query_start_loc_cpu=[0, num_tokens],
            seq_lens_cpu=[num_tokens],
        )
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(num_tokens, device=self.device), caches, attn)
        rows = min(sc.max_num_seqs, num_tokens)
        self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del caches, hidden
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info()
        budget = total * self.config.cache_config.gpu_memory_utilization - peak
        if budget <= 0:
            raise ValueError(f"no GPU memory left for the KV cache (peak use {peak / 2**30:.1f} GiB)")
        return int(budget // self._bytes_per_block())

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> BatchInputs:
        """Pack the step's tokens; `scheduled` must list single-token (decode) requests first."""
        bs = self.block_size
        num_decodes = 0
        while num_decodes < len(scheduled) and scheduled[num_decodes].num_new_tokens == 1:
            num_decodes += 1
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        query_start_loc = [0]
        seq_lens = []
        logits_indices = []
        sample_requests = []
        max_blocks = max(cdiv(s.request.num_computed_tokens + s.num_new_tokens, bs) for s in scheduled)
        block_tables = np.zeros((len(scheduled), max_blocks), dtype=np.int32)  # [B, max_blocks]
        for i, s in enumerate(scheduled):
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(s.request.all_token_ids[start:end] if s.num_new_tokens > 1 else [_token_at(s.request, start)])
            pos = np.arange(start, end)
            table = np.asarray(s.block_ids[: cdiv(end, bs)], dtype=np.int64)
            block_tables[i, : len(table)] = table
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            query_start_loc.append(query_start_loc[-1] + s.num_new_tokens)
            seq_lens.append(end)
            if s.samples:
                logits_indices.append(query_start_loc[-1] - 1)
                sample_requests.append(s.request)
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(block_tables).to(dev, non_blocking=True),
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        return BatchInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev, non_blocking=True),
            attn=attn,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=dev),
            sample_requests=sample_requests,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepOutput:
        scheduled = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1)
        batch = self.prepare_inputs(scheduled)
        if self.lora_manager is not None:  # the model's LoRA layers read the step's slots from here
            batch.lora = self.lora_manager.prepare(scheduled, out.active_loras)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn)  # [T, hidden]
        if not batch.sample_requests:
            return StepOutput({}, {})
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [S, vocab] float32
        meta = build_sampling_metadata(batch.sample_requests, self.vocab_size, self.device)
        result = self.sampler(logits, meta)
        ids = [r.request_id for r in batch.sample_requests]
        sampled = dict(zip(ids, result.sampled_token_ids.tolist()))
        logprobs = {}
        if result.logprobs is not None:
            rows = zip(result.logprob_token_ids.tolist(), result.logprobs.tolist(), result.sampled_token_ranks.tolist())
            for request, (tok, lp, rank) in zip(batch.sample_requests, rows):
                k = request.sampling_params.logprobs
                if k is not None:
                    logprobs[request.request_id] = (tok[: k + 1], lp[: k + 1], rank)
        return StepOutput(sampled, logprobs)


def _token_at(request: Request, position: int) -> int:
    """One token without building the whole token list (the decode hot path)."""
    n = request.num_prompt_tokens
    return request.prompt_token_ids[position] if position < n else request.output_token_ids[position - n]

