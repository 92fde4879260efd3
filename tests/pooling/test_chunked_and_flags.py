"""Long-input embedding's split and combine, Cohere's packed embedding types, and the pooling flags' vLLM forms
(`--pooler-config.KEY VALUE`, `--hf-overrides`)."""

from __future__ import annotations

import json

import pytest
import torch

from loomserve.api.cli import engine_args_from, make_parser
from loomserve.api.pooling_encoding import typed_embeddings
from loomserve.platform.config.hf_overrides import apply_hf_overrides
from loomserve.pooling.chunked import split_long
from loomserve.pooling.config import resolve_pooling
from loomserve.pooling.params import PoolingParams


def test_a_long_prompt_is_split_into_raw_chunks_and_short_ones_run_whole():
    params = PoolingParams(pooling_type="MEAN", normalize=True, dimensions=2)
    chunked = split_long([(list(range(10)), params), ([7, 8], params)], chunk_length=4, max_embed_len=None)
    assert [ids for ids, _ in chunked.requests] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [7, 8]]
    assert chunked.owners == [0, 0, 0, 1]
    raw = chunked.requests[0][1]
    assert (raw.normalize, raw.dimensions, raw.pooling_type) == (False, None, "MEAN")
    assert chunked.requests[3][1] is params


def test_chunk_outputs_combine_by_token_weighted_mean_then_finish():
    params = PoolingParams(pooling_type="MEAN", normalize=True, dimensions=2)
    chunked = split_long([(list(range(6)), params), ([1], params)], chunk_length=4, max_embed_len=None)
    whole = torch.tensor([0.6, 0.8])
    got = chunked.combine([torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0.0, 3.0, 5.0]), whole])
    want = torch.nn.functional.normalize(torch.tensor([4 * 1.0, 2 * 3.0]) / 6, dim=-1)
    assert torch.allclose(got[0], want) and got[1] is whole


def test_a_prompt_over_max_embed_len_is_refused():
    with pytest.raises(ValueError, match="max_embed_len of 5"):
        split_long([(list(range(6)), PoolingParams())], chunk_length=4, max_embed_len=5)


def test_binary_types_pack_signs_most_significant_bit_first():
    vector = torch.tensor([[0.5, -0.1, 0.0, -1.0, 0.2, 0.3, -0.4, 1.0]])  # signs 1 0 1 0 1 1 0 1 = 0b10101101
    got = typed_embeddings(vector, ["ubinary", "binary", "int8", "uint8"])
    assert got["ubinary"] == [[0b10101101]] and got["binary"] == [[0b10101101 - 128]]
    assert got["int8"] == [[64, -13, 0, -127, 25, 38, -51, 127]]
    assert got["uint8"] == [[191, 115, 128, 0, 153, 166, 76, 255]]
    with pytest.raises(ValueError, match="divisible by 8"):
        typed_embeddings(torch.ones(1, 12), ["binary"])


def test_dotted_flags_set_keys_of_their_json_flag():
    ns = make_parser().parse_args(["serve", "m", "--pooler-config", '{"pooling_type": "MEAN"}',
                                   "--pooler-config.task", "embed", "--pooler-config.max_embed_len=100",
                                   "--hf-overrides.is_matryoshka", "true"])
    args = engine_args_from(ns)
    assert json.loads(args.pooler_config) == {"pooling_type": "MEAN", "task": "embed", "max_embed_len": 100}
    assert json.loads(args.hf_overrides) == {"is_matryoshka": True}


def test_pooler_config_task_chooses_the_task_unless_task_disagrees(tmp_path):
    from transformers import BertConfig

    config = BertConfig(architectures=["BertModel"])
    assert resolve_pooling(str(tmp_path), config, "auto", {"task": "embed"}).task == "embed"
    with pytest.raises(ValueError, match="disagree"):
        resolve_pooling(str(tmp_path), config, "classify", {"task": "embed"})


def test_hf_overrides_update_the_config_and_its_sub_configs():
    from transformers import LlavaConfig

    config = LlavaConfig()
    apply_hf_overrides(config, '{"is_matryoshka": true, "text_config": {"max_position_embeddings": 77}}')
    assert config.is_matryoshka is True and config.text_config.max_position_embeddings == 77
    with pytest.raises(ValueError, match="--hf-overrides"):
        apply_hf_overrides(config, "[1]")
