"""EngineArgs, the flat user-facing knobs, and EngineConfig, the checked sub-configs they resolve into.

Each EngineArgs field carries its help text (and choices) in its metadata: the CLI builds its flags from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from loomserve.modalities.config import MultiModalConfig, build_mm_config
from loomserve.platform.attention import resolve_attention_backend
from loomserve.platform.config.cache import KV_CACHE_DTYPES, CacheConfig, parse_memory
from loomserve.platform.config.checkpoint import locate_checkpoint
from loomserve.platform.config.hf_overrides import apply_hf_overrides
from loomserve.platform.config.kv_transfer import OFFLOADING, KVTransferConfig, parse_kv_transfer_config
from loomserve.platform.config.lora import LoRAConfig
from loomserve.platform.config.model import (
    ModelConfig,
    context_limit,
    default_served_name,
    parse_model_len,
    resolve_device,
    resolve_dtype,
)
from loomserve.platform.config.parallel import EXECUTOR_BACKENDS, ParallelConfig
from loomserve.platform.config.scheduler import SchedulerConfig
from loomserve.platform.config.speculative import (
    SpeculativeConfig,
    check_speculative_config,
    locate_speculative_model,
    parse_speculative_config,
)
from loomserve.platform.models.registry import get_model_class, is_encoder_decoder
from loomserve.platform.quantization.gguf import gguf_config, split_gguf_path
from loomserve.platform.quantization.methods import QUANTIZATION_METHODS


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    attention_backend: str = "torch"
    enforce_eager: bool = False  # no CUDA graphs
    max_cudagraph_capture_size: int = 512  # largest step (tokens) a mixed prefill/decode graph holds; 0: decode only
    async_scheduling: bool = False  # schedule step N+1 while the device runs step N
    lora_config: LoRAConfig | None = None  # None: LoRA off
    mm_config: MultiModalConfig = field(default_factory=MultiModalConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    kv_transfer_config: KVTransferConfig | None = None  # None: KV stays in the device's pool
    speculative_config: SpeculativeConfig | None = None  # None: no speculative decoding


def _arg(default: Any, help: str, **cli: Any) -> Any:
    """A field whose metadata the CLI turns into a flag: its help text and any argparse extras (choices)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineArgs:
    """The flat, user-facing knobs (CLI flags and `LLM(...)` keywords), vLLM's names."""

    model: str = field(metadata={"help": "Hugging Face checkpoint folder or hub name, or a GGUF file; `loomserve "
                                         "serve` without one serves a random demo checkpoint"})
    tokenizer: str | None = _arg(None, "tokenizer folder or name (default: MODEL)")
    revision: str | None = _arg(None, "hub branch, tag or commit of MODEL (and of its tokenizer) to fetch")
    download_dir: str | None = _arg(None, "where hub checkpoints are downloaded and cached (default: the Hugging "
                                           "Face cache)")
    trust_remote_code: bool = _arg(False, "let transformers run the checkpoint's own code for its config and "
                                          "tokenizer (models run on loomserve's implementations)")
    served_model_name: str | list[str] | None = _arg(
        None, "the model name(s) clients send; responses carry the first (default: MODEL)")
    dtype: str = _arg("auto", "auto, float32, bfloat16 or float16 (auto: float32 on CPU, bfloat16 on CUDA)")
    device: str = _arg("auto", "auto, cpu, cuda, cuda:1, ...")
    cpu_threads: int | None = _arg(
        None, "intra-op threads of a CPU engine (default: OMP_NUM_THREADS, else the cores this process may use, by "
              "affinity and cgroup quota, less one for the server's front end); see platform/threads.py")
    max_model_len: int | str | None = _arg(None, "context length, e.g. 8192, 8k (8000) or 8K (8192) (default: "
                                                 "the model's)")
    max_logprobs: int = _arg(20, "most logprobs a request may ask for (per token, and of the prompt); -1: no cap")
    generation_config: str | None = _arg(
        None, "vllm: sampling defaults are loomserve's (the checkpoint's generation_config.json gives only its "
              "stop tokens); auto or a folder (its sampling defaults) is not supported yet")
    load_format: str = _arg("auto", "auto, safetensors or dummy (random weights)")
    seed: int = _arg(0, "seed of the random weights of load_format dummy and of unseeded sampling")
    block_size: int = _arg(16, "tokens per KV-cache block")
    kv_cache_memory: int | str | None = _arg(None, "KV-cache size, e.g. 4GiB (wins over utilization)")
    kv_cache_dtype: str = _arg(
        "auto", "the KV cache's dtype: auto (the model's), or fp8 (= fp8_e4m3) / fp8_e5m2: half the bytes of bf16, "
                "keys and values scaled per layer (scales from the checkpoint, else 1.0)",
        choices=list(KV_CACHE_DTYPES))
    calculate_kv_scales: bool = _arg(
        False, "an fp8 KV cache's per-layer scales from the first step's keys and values (absolute max / 200 for "
               "keys, / 100 for values) instead of the checkpoint's or 1.0")
    gpu_memory_utilization: float = _arg(0.9, "share of the GPU's memory the engine may use, KV cache included")
    num_gpu_blocks_override: int | None = _arg(None, "KV-cache blocks to allocate, whatever memory says")
    enable_prefix_caching: bool = _arg(True, "reuse the KV blocks of prompt prefixes seen before")
    max_num_batched_tokens: int | None = _arg(None, "token budget of one step (default: chosen for the device)")
    max_num_seqs: int = _arg(256, "requests in one step")
    enable_chunked_prefill: bool = _arg(True, "split long prompts over several steps, beside the decodes (encoders "
                                              "always run prompts whole)")
    attention_backend: str = _arg("auto", "auto, torch or triton")
    enforce_eager: bool = _arg(False, "no CUDA graphs: run every step eagerly")
    max_cudagraph_capture_size: int = _arg(
        512, "steps of up to this many tokens (prefill chunks beside decodes) replay CUDA graphs; "
             "0: only decode-only steps do")
    async_scheduling: bool | None = _arg(
        None, "schedule the next step while the GPU runs this one (default: on for CUDA, off for CPU, where "
              "nothing runs asynchronously)")
    enable_prompt_embeds: bool = _arg(
        False, "accept prompt_embeds (embeddings in place of a prompt's token ids) on /v1/completions and in "
               "LLM.generate({'prompt_embeds': tensor})")
    enable_mm_embeds: bool = _arg(
        False, "accept precomputed media embeddings in place of media (image_embeds / audio_embeds chat parts, "
               "tensors in multi_modal_data): they bypass the encoder")
    skip_tokenizer_init: bool = _arg(
        False, "load no tokenizer: prompts must be token ids, outputs carry token ids and no text")
    enable_lora: bool = _arg(False, "serve LoRA adapters on top of the model")
    max_loras: int = _arg(1, "adapters in one step")
    max_lora_rank: int = _arg(16, "largest adapter rank served")
    max_cpu_loras: int | None = _arg(None, "adapters cached in host memory (default: max_loras)")
    quantization: str | None = _arg(
        None, "the checkpoint's quantization (read from it; this may only confirm it), or for a dense checkpoint: "
              "bitsandbytes (NF4 base weights, QLoRA) or fp8 (FP8 W8A8), quantized at load",
        choices=list(QUANTIZATION_METHODS))
    task: str = _arg("auto", "what MODEL serves (default: read from the checkpoint)",
                     choices=["auto", "generate", "embed", "classify"])
    pooler_config: str | dict | None = _arg(
        None, 'JSON overrides of the pooling defaults, e.g. \'{"pooling_type": "MEAN", "normalize": true}\'')
    hf_overrides: str | dict | None = _arg(
        None, 'JSON changes to the checkpoint\'s config.json, e.g. \'{"is_matryoshka": true}\'')
    limit_mm_per_prompt: dict[str, int] | str | None = _arg(
        None, 'most media items per prompt, JSON, e.g. \'{"image": 4, "video": 1, "audio": 2}\'')
    allowed_media_domains: list[str] | None = _arg(
        None, "hosts (and their subdomains) http(s) media URLs may name; none: no remote media")
    allowed_local_media_path: str | None = _arg(None, "folder file:// media URLs may read from")
    max_image_pixels: int = _arg(89_478_485, "largest image (or video frame) in pixels, checked before decoding")
    encoder_cache_memory: int | str = _arg("256MiB", "memory for encoder outputs reused across requests, e.g. 256MiB")
    media_io_kwargs: dict[str, dict[str, Any]] | str | None = _arg(
        None, 'media decoding options, JSON, e.g. \'{"video": {"num_frames": 8}}\' or \'{"video": {"fps": 1}}\'')
    mm_processor_cache_gb: float = _arg(4, "GiB of processed media the front end keeps to reuse for the same bytes "
                                           "(no decoding or preprocessing again); 0 disables it")
    tensor_parallel_size: int = _arg(1, "tensor-parallel ranks: the model's heads, MLPs and vocabulary split across "
                                        "this many processes (devices)")
    data_parallel_size: int = _arg(1, "data-parallel engine replicas behind one server (`loomserve serve`), each "
                                      "in its own process with its own KV cache")
    data_parallel_routing: str = _arg(
        "cache_aware", "how the server picks a data-parallel replica: cache_aware (prefix-cache affinity, then load) "
                       "or round_robin", choices=["cache_aware", "round_robin"])
    pipeline_parallel_size: int = _arg(1, "pipeline stages (only 1 is supported yet)")
    distributed_executor_backend: str | None = _arg(
        None, "mp: the runner in its own process, one per rank; ray: one Ray actor per rank, on the running Ray "
              "cluster or a local Ray instance (default: mp when tensor_parallel_size > 1, else the runner in the "
              "engine's process)", choices=list(EXECUTOR_BACKENDS))
    nnodes: int = _arg(1, "hosts the tensor-parallel ranks span (mp backend); nodes other than 0 run `loomserve serve "
                          "... --node-rank N --headless`")
    node_rank: int = _arg(0, "this host's index among the nnodes; node 0 runs the engine and the server")
    master_addr: str = _arg("127.0.0.1", "node 0's address, where the ranks of every node meet")
    master_port: int = _arg(29501, "node 0's port for the ranks' rendezvous; the next port carries the steps")
    enable_expert_parallel: bool = _arg(False, "split MoE experts across ranks instead of slicing each expert")
    speculative_config: str | dict | None = _arg(
        None, 'speculative decoding, JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
              '"prompt_lookup_max": 3}\' or \'{"method": "draft_model" | "eagle3", "model": PATH, '
              '"num_speculative_tokens": 4}\'')
    kv_offloading_size: float | None = _arg(
        None, "GiB of host memory for a CPU tier of the prefix cache: blocks evicted from the device come back "
              "from there on a hit")
    kv_transfer_config: str | dict | None = _arg(
        None, 'KV connector, JSON, e.g. \'{"kv_connector": "TcpConnector", "kv_role": "kv_producer"}\' '
              "(disaggregated prefill/decode: kv_producer, kv_consumer or kv_both); TcpConnector across hosts, "
              "SharedMemoryConnector on one host")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def served_model_names(self) -> list[str]:
        """The names clients may send, the first the one responses carry (default: MODEL as given)."""
        names = self.served_model_name
        if not names:
            return [default_served_name(self.model)]
        return [names] if isinstance(names, str) else list(names)

    def create_engine_config(self) -> EngineConfig:
        from transformers import AutoConfig

        from loomserve.platform.quantization.methods import check_quantization
        from loomserve.pooling.config import resolve_pooling

        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}; choose auto, safetensors or dummy")
        parallel_config = self._parallel_config()
        spec = parse_speculative_config(self.speculative_config) if self.speculative_config is not None else None
        spec = locate_speculative_model(spec, self.download_dir) if spec is not None else None
        self._refuse_generation_config()
        model, gguf_file = split_gguf_path(locate_checkpoint(self.model, self.revision, self.download_dir))
        tokenizer = locate_checkpoint(self.tokenizer, self.revision, self.download_dir) if self.tokenizer else model
        if gguf_file is not None:
            hf_config = gguf_config(model, gguf_file)
        else:
            hf_config = AutoConfig.from_pretrained(model, trust_remote_code=self.trust_remote_code)
        apply_hf_overrides(hf_config, self.hf_overrides)
        text = hf_config.get_text_config()
        device = resolve_device(self.device)
        limit = context_limit(text)
        pooling = resolve_pooling(model, hf_config, self.task, self.pooler_config)
        limit = min(limit, pooling.max_model_len or limit)
        max_model_len = parse_model_len(self.max_model_len) or limit
        if max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no cap) or at least 0, got {self.max_logprobs}")
        model_config = ModelConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=resolve_dtype(self.dtype, device),
            device=device,
            max_model_len=max_model_len,
            load_format=self.load_format,
            seed=self.seed,
            hf_config=hf_config,
            served_model_name=self.served_model_names()[0],
            quantization=check_quantization(self.quantization, hf_config, gguf_file),
            gguf_file=gguf_file,
            task=pooling.task,
            encoder_only=pooling.encoder_only,
            pooler_config=pooling.pooler_config,
            served_model_aliases=tuple(self.served_model_names()[1:]),
            trust_remote_code=self.trust_remote_code,
            max_logprobs=self.max_logprobs,
            enable_prompt_embeds=self.enable_prompt_embeds,
            enable_mm_embeds=self.enable_mm_embeds,
            skip_tokenizer_init=self.skip_tokenizer_init,
        )
        if self.kv_cache_dtype != "auto" and pooling.encoder_only:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} quantizes the KV cache, and "
                             f"{model_config.architecture} (an encoder) keeps no KV cache: leave it auto")
        cache_config = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=parse_memory(self.kv_cache_memory),
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            # an encoder-decoder's KV depends on its audio, which no block hash covers (vLLM turns it off too)
            enable_prefix_caching=(self.enable_prefix_caching and not pooling.encoder_only
                                   and not is_encoder_decoder(model_config.architecture)),
            cache_dtype=self.kv_cache_dtype,
            calculate_kv_scales=self.calculate_kv_scales,
        )
        budget = self.max_num_batched_tokens or _default_token_budget(device, max_model_len, pooling.encoder_only)
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=self.max_num_seqs,
            enable_chunked_prefill=self.enable_chunked_prefill and not pooling.encoder_only,
            num_lookahead_tokens=spec.num_lookahead_tokens if spec is not None else 0,
        )
        parallel_config.check_model(text, get_model_class(model_config.architecture, model_config.task))
        if spec is not None:
            check_speculative_config(spec, model_config)
        lora_config = None
        if self.enable_lora:
            _check_lora_support(model_config)
            lora_config = LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras or self.max_loras)
        backend = resolve_attention_backend(self.attention_backend, device)
        async_scheduling = device.type == "cuda" if self.async_scheduling is None else self.async_scheduling
        mm_config = build_mm_config(
            self.limit_mm_per_prompt, self.allowed_media_domains, self.allowed_local_media_path,
            self.max_image_pixels, parse_memory(self.encoder_cache_memory), self.media_io_kwargs,
            self.mm_processor_cache_gb,
        )
        if self.max_cudagraph_capture_size < 0:
            raise ValueError(f"max_cudagraph_capture_size must be at least 0, got {self.max_cudagraph_capture_size}")
        return EngineConfig(
            model_config, cache_config, scheduler_config, backend, self.enforce_eager,
            min(self.max_cudagraph_capture_size, budget), async_scheduling, lora_config, mm_config, parallel_config,
            self._kv_transfer_config(cache_config),
            spec,
        )

    def _kv_transfer_config(self, cache_config: CacheConfig) -> KVTransferConfig | None:
        config = parse_kv_transfer_config(self.kv_transfer_config, self.kv_offloading_size)
        if config is not None and config.offload_bytes and not cache_config.enable_prefix_caching:
            raise ValueError("kv_offloading_size keeps evicted prefix-cache blocks: it needs prefix caching (and a "
                             "model with a KV cache)")
        if config is not None and config.kv_connector != OFFLOADING and cache_config.calculate_kv_scales:
            raise ValueError("calculate_kv_scales takes each instance's fp8 scales from its own first step, so another "
                             "instance would read the blocks it is sent with the wrong scales: drop it (the "
                             "checkpoint's scales, or 1.0, are the same everywhere)")
        return config

    def _parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.data_parallel_size, self.pipeline_parallel_size,
                              self.distributed_executor_backend, self.enable_expert_parallel,
                              self.data_parallel_routing, self.nnodes, self.node_rank, self.master_addr,
                              self.master_port)

    def _refuse_generation_config(self) -> None:
        if self.generation_config not in (None, "vllm"):
            raise ValueError(f"generation_config {self.generation_config!r} is not supported yet: requests take "
                             "loomserve's sampling defaults (generation_config vllm)")


def _default_token_budget(device: torch.device, max_model_len: int, encoder_only: bool) -> int:
    """Bigger steps keep a GPU's matmuls efficient; a CPU keeps them short so decodes are not starved. Encoders (no
    KV cache, no decodes) run every prompt whole, so a step holds at least one whole context; on CPU they pack 4096
    tokens, where their matmuls run most efficiently (measured for all-MiniLM-L6-v2)."""
    if device.type == "cuda":
        return max(8192, max_model_len) if encoder_only else 8192
    return max(4096, max_model_len) if encoder_only else max(2048, min(max_model_len, 8192))


def _check_lora_support(model_config: ModelConfig) -> None:
    """Refuse --enable-lora before any weight loads for a model class that takes no adapters."""
    model_cls = get_model_class(model_config.architecture, model_config.task)
    if not model_cls.supports_lora:
        raise ValueError(f"{model_config.architecture} takes no LoRA adapters (LoRA adapts decoder layers): "
                         "serve it without --enable-lora")
