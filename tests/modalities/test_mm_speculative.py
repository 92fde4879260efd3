"""n-gram speculation on multimodal targets: drafts are text tokens after the media, verified with the target's
media embeddings and (Qwen2-VL) M-RoPE positions, so greedy output still equals transformers'."""

from __future__ import annotations

import pytest
from media_samples import noise_image
from mm_reference import hf_greedy, ids_of, image_prompt
from test_mm_greedy import GREEDY

from loomserve import LLM
from loomserve.platform.config import EngineArgs

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_ngram_speculation_with_an_image_equals_transformers(mm_checkpoint, family):
    path = mm_checkpoint(family)
    image = noise_image(56, 56, seed=1)
    ids = ids_of(path, image_prompt(family, 1))
    llm = LLM(path, block_size=4, kv_cache_memory="8MiB", speculative_config=NGRAM)
    [out] = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": image}}], GREEDY)
    assert out.outputs[0].token_ids == hf_greedy(path, ids, images=[image])


@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_a_drafting_model_for_a_multimodal_target_is_refused(mm_checkpoint, method):
    path = mm_checkpoint("llava")
    spec = {"method": method, "model": path, "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match=f"a {method} proposer for a multimodal target is not supported"):
        EngineArgs(path, device="cpu", speculative_config=spec).create_engine_config()
