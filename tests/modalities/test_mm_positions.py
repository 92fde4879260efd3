"""M-RoPE positions equal transformers' `get_rope_index` for Qwen2-VL and Qwen2.5-VL prompts with images and
videos, and generated tokens continue from the rope delta; the rotary table picks each dim's row by section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from loomserve.platform.models.mrope import MRopeGrid, MRotaryEmbedding, chunk_positions, mrope_positions

IMAGE, VIDEO = 5, 6


class RopeIndex:
    """Just enough of the HF model to call its position code."""

    def __init__(self, model_cls: type, config: object) -> None:
        self.config = config
        self.get_rope_index = model_cls.get_rope_index.__get__(self)
        self.get_vision_position_ids = model_cls.get_vision_position_ids.__get__(self)


def prompt() -> tuple[list[int], list[tuple[str, int, tuple[int, int, int]]]]:
    """Text, a 1x4x6 image (6 tokens), text, a 3x4x4 video (12 tokens, more frames than rows), text."""
    ids = [1, 2, 3] + [IMAGE] * 6 + [4, 4] + [VIDEO] * 12 + [7, 8, 9, 10]
    return ids, [("image", 3, (1, 4, 6)), ("video", 11, (3, 4, 4))]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_prompt_positions_and_delta_equal_transformers(family):
    ids, items = prompt()
    second_per_grid, tokens_per_second = 1.5, 2
    if family == "qwen2_vl":
        hf = RopeIndex(Qwen2VLModel, Qwen2VLConfig(image_token_id=IMAGE, video_token_id=VIDEO))
        kwargs = {}
    else:
        config = Qwen2_5_VLConfig(image_token_id=IMAGE, video_token_id=VIDEO,
                                  vision_config={"tokens_per_second": tokens_per_second})
        hf = RopeIndex(Qwen2_5_VLModel, config)
        kwargs = {"second_per_grid_ts": torch.tensor([second_per_grid])}
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    grids = {m: torch.tensor([g for kind, _, g in items if kind == m]) for m in ("image", "video")}
    positions, delta = hf.get_rope_index(input_ids, types, image_grid_thw=grids["image"],
                                         video_grid_thw=grids["video"], **kwargs)
    interval = tokens_per_second * second_per_grid if family == "qwen2_5_vl" else 1.0
    ours = mrope_positions(len(ids), [
        MRopeGrid(offset, t, h // 2, w // 2, interval if kind == "video" else 1.0) for kind, offset, (t, h, w) in items
    ])
    assert np.array_equal(ours.prompt, positions[:, 0].numpy())
    assert ours.delta == int(delta)


def test_generated_tokens_continue_from_the_delta_in_every_row():
    mrope = mrope_positions(10, [MRopeGrid(2, 1, 2, 3)])  # 6 image tokens at 2..7: positions 2..4, then 5, 6
    assert mrope.prompt[:, -2:].tolist() == [[5, 6]] * 3
    assert mrope.delta == 7 - 10
    chunk = chunk_positions(mrope, 8, 12)  # two prompt tokens, then two generated ones
    assert chunk.tolist() == [[5, 6, 7, 8]] * 3


def test_each_rotary_dim_takes_its_row_from_mrope_section():
    class Config:
        rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 2, 1]}

    rotary = MRotaryEmbedding(Config(), head_dim=8)
    positions = torch.tensor([[3], [5], [7]])  # one token: t=3, h=5, w=7
    cos_sin = rotary(positions)[0]
    inv_freq = rotary.inv_freq
    expected = torch.stack([3 * inv_freq[0], 5 * inv_freq[1], 5 * inv_freq[2], 7 * inv_freq[3]])
    assert torch.allclose(cos_sin, torch.cat([expected.cos(), expected.sin()]))
    assert torch.equal(rotary(torch.tensor([4, 9])), rotary(torch.tensor([[4, 9]] * 3)))  # text: rows agree
