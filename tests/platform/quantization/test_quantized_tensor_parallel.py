"""Quantized weights under tensor parallelism compute what one device computes: two gloo ranks on the CPU, each
reading only its shard of the quantized tensors, decode the same greedy tokens (and logits) as one process (which
the other quantization tests hold equal to transformers). A layout whose shard boundary falls inside a scale block
or a quantization group is refused by name."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from loomserve.platform.models.packing import decoder_linears
from loomserve.platform.quantization.int4 import Int4Scheme, shard_int4
from loomserve.platform.quantization.tensor_parallel import Shard
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.gguf_checkpoints import tiny_gguf
from loomserve.testing.int4_checkpoints import SHAPE, tiny_int4
from loomserve.testing.nf4_checkpoints import tiny_nf4
from loomserve.testing.quantized_checkpoints import tiny_compressed_tensors

sys.path.insert(0, str(Path(__file__).parents[1]))  # paged_batch, beside the platform tests
from paged_batch import greedy_decode, load  # noqa: E402

# case -> (checkpoint folder, engine arguments)
CASES: dict[str, tuple[Callable[[], Path], dict]] = {
    "fp8-per-channel": (lambda: tiny_compressed_tensors("FP8_DYNAMIC"), {}),
    "fp8-at-load": (lambda: tiny_checkpoint("llama", **SHAPE), {"quantization": "fp8"}),
    "w4a16-groups": (lambda: tiny_compressed_tensors("W4A16"), {}),
    "gptq-act-order": (lambda: tiny_int4("gptq", 128, act_order=True)[0], {}),  # row-parallel rows of any group
    "awq": (lambda: tiny_int4("awq", 64)[0], {}),
    "nf4-kv1": (lambda: tiny_checkpoint("llama", **{**SHAPE, "num_kv_heads": 1}),  # one KV head, replicated
                {"quantization": "bitsandbytes"}),
    "nf4-prequantized": (tiny_nf4, {}),  # saved 4-bit blocks cut whole
    "gguf-q8_0": (lambda: tiny_gguf("Q8_0"), {}),
}
REFUSED = {"fp8-block": lambda: tiny_compressed_tensors("FP8_BLOCK")}  # k/v: 128 rows, a 128-row block, 2 ranks
TOLERANCE = 1e-5
# bitsandbytes multiplies NF4 weights in bfloat16 on a CPU with AVX512-BF16 (it repacks them on the first call): a
# rank's partial sum is rounded to bfloat16 where one device rounds the whole sum, a few bf16 ulps after two layers.
NF4_TOLERANCE = 3e-2


def decode(case: str) -> tuple[list[list[int]], torch.Tensor, int, int]:
    """Greedy tokens, logits, parameter bytes and dense decoder linears left of one case's model in this process."""
    folder, engine_args = CASES[case]
    model = load(folder(), **engine_args)
    tokens, logits, _ = greedy_decode(model)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return tokens, logits, held, len(decoder_linears(model, (nn.Linear,)))


def _rank_main(rank: int, size: int, init_method: str, out: str) -> None:
    from loomserve.platform.distributed.parallel_state import init_tensor_parallel

    init_tensor_parallel(rank, size, init_method, torch.device("cpu"))
    results: dict = {case: decode(case) for case in CASES}
    for case, folder in REFUSED.items():
        try:
            load(folder())
        except ValueError as e:
            results[case] = str(e)
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case decoded by two gloo ranks (rank 0's view; every rank ends with the same logits)."""
    from loomserve.platform.executor import _free_port

    for folder, _ in CASES.values():
        folder()  # built once here, not raced by the ranks
    for folder in REFUSED.values():
        folder()
    out = tmp_path_factory.mktemp("quant-tp") / "results.pt"
    mp.spawn(_rank_main, args=(2, f"tcp://127.0.0.1:{_free_port()}", str(out)), nprocs=2)
    return torch.load(out)


@functools.cache
def one_device(case: str) -> tuple[list[list[int]], torch.Tensor, int, int]:
    return decode(case)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_decode_what_one_device_decodes(case: str, two_ranks) -> None:
    tokens, logits, held, dense = two_ranks[case]
    expected_tokens, expected_logits, all_held, all_dense = one_device(case)
    assert dense == all_dense  # as many decoder linears quantized (all; GGUF: none, dequantized at load)
    assert held < 0.75 * all_held  # a rank holds its shard only (norms are replicated)
    assert tokens == expected_tokens
    tolerance = NF4_TOLERANCE if case.startswith("nf4") else TOLERANCE
    assert ((logits - expected_logits).abs().max() / expected_logits.abs().max()).item() < tolerance


def test_a_shard_boundary_inside_a_weight_scale_block_is_refused(two_ranks) -> None:
    assert "inside a weight scale block of 128" in two_ranks["fp8-block"]
    assert "output rows 0..64 of 128" in two_ranks["fp8-block"]


def test_a_row_parallel_shard_of_partial_int4_groups_is_refused() -> None:
    """Two ranks of a 192-column input cut each group of 128 columns: the second rank's group would be split."""
    group = {"qweight": torch.zeros(192 // 8, 16, dtype=torch.int32), "scales": torch.ones(2, 16),
             "qzeros": torch.zeros(2, 2, dtype=torch.int32)}
    with pytest.raises(ValueError, match="input columns 96..192 of 192, inside a quantization group of 128"):
        shard_int4(group, Shard(rows=False, start=96, size=96, full=192), Int4Scheme("gptq", 128))
