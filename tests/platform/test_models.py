"""Each decoder family, over packed batches through the paged KV cache, computes transformers' logits."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from paged_batch import PagedRunner, load

from loomserve.testing.checkpoints import INIT_STD, tiny_checkpoint

CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral-gqa4": ("mistral", {"num_heads": 8, "num_kv_heads": 2}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "qwen3-head_dim32": ("qwen3", {"head_dim": 32}),  # hidden 64 / 4 heads would be 16
    "llama-biases": ("llama-biases", {}),
}
TOLERANCE = 1e-5  # max |ours - transformers| / max |transformers| over a sequence's logits (fp32: ~1e-6)


def _llama_with_biases(path: Path) -> Path:
    """A llama with attention_bias and mlp_bias on (tiny_checkpoint has no switch for them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_bias=True,
        mlp_bias=True,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else INIT_STD * noise)
    model.save_pretrained(path)
    return path


@functools.cache
def models(case: str, tmp_root: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers reference, ours loaded from the same checkpoint), both fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    family, kwargs = CASES[case]
    if family == "llama-biases":
        path = _llama_with_biases(tmp_root / case)
    else:
        path = tiny_checkpoint(family, **kwargs)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return reference.eval(), load(path)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@torch.inference_mode()
def reference_logits(reference: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    return reference(torch.tensor([tokens])).logits[0].float()  # [n, V]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("case", CASES)
def test_packed_prefill_matches_transformers(case: str, tmp_root: Path) -> None:
    reference, ours = models(case, tmp_root)
    vocab = reference.config.vocab_size
    prompts = {f"p{i}": random_tokens(n, vocab, seed=i) for i, n in enumerate([5, 17, 33])}
    logits = PagedRunner(ours, block_size=16).step(prompts)
    for seq, tokens in prompts.items():
        assert relative_error(logits[seq], reference_logits(reference, tokens)) < TOLERANCE, seq


@pytest.mark.parametrize("case", CASES)
def test_decode_beside_chunked_prefill_matches_transformers(case: str, tmp_root: Path) -> None:
    """`a` decodes greedily through block boundaries while `b` is still prefilling in chunks."""
    reference, ours = models(case, tmp_root)
    vocab = reference.config.vocab_size
    runner = PagedRunner(ours, block_size=4)
    a, b = random_tokens(6, vocab, seed=10), random_tokens(21, vocab, seed=11)
    fed = {"a": list(a), "b": b[:9]}
    out = runner.step({"a": a, "b": b[:9]})
    logits = {seq: [out[seq]] for seq in out}
    for step_b in (b[9:17], b[17:], None, None, None):
        next_a = [int(logits["a"][-1][-1].argmax())]
        next_b = step_b or [int(logits["b"][-1][-1].argmax())]
        out = runner.step({"a": next_a, "b": next_b})
        for seq, tokens in (("a", next_a), ("b", next_b)):
            fed[seq] += tokens
            logits[seq].append(out[seq])
    for seq, tokens in fed.items():
        assert relative_error(torch.cat(logits[seq]), reference_logits(reference, tokens)) < TOLERANCE, seq


def test_bfloat16_model_computes_in_bfloat16_close_to_float32() -> None:
    path = tiny_checkpoint("qwen3")
    tokens = {"s": list(range(3, 40))}
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        model = load(path, dtype=dtype)
        runner = PagedRunner(model, block_size=16)
        assert runner.kv_caches[0].dtype == model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
        outputs[dtype] = runner.step(tokens)["s"]
    assert outputs["bfloat16"].dtype == torch.float32
    assert relative_error(outputs["bfloat16"], outputs["float32"]) < 0.1  # transformers' own bf16: ~0.03
