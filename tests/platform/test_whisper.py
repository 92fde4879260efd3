"""Whisper in the engine: greedy decoding equals transformers' `WhisperForConditionalGeneration.generate` on a tiny
seeded checkpoint, for short clips, a clip of almost 30 s and long audio cut at quiet points, batched or alone; each
request's cross-attention keys and values are made once, freed when it ends, and admitted within their budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loomserve.modalities.audio_split import split_audio
from loomserve.platform.request import SamplingParams
from loomserve.testing.whisper_checkpoints import tiny_whisper_checkpoint

RATE = 16000
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint() -> str:
    return str(tiny_whisper_checkpoint())


@pytest.fixture(scope="module")
def llm(checkpoint):
    from loomserve import LLM

    return LLM(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(checkpoint).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(checkpoint)

    def generate(clip: np.ndarray, task: str = "transcribe", language: str = "en") -> list[int]:
        features = extractor(clip, sampling_rate=RATE, return_tensors="pt").input_features
        with torch.no_grad():
            out = model.generate(features, language=language, task=task, max_new_tokens=MAX_TOKENS, do_sample=False)
        return out[0].tolist()

    return generate


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def _prompt(llm, task: str = "transcribe", language: str = "en") -> list[int]:
    tokens = ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
    return llm.get_tokenizer().convert_tokens_to_ids(tokens)


def _generate(llm, clips: list[np.ndarray], task: str = "transcribe", language: str = "en") -> list[list[int]]:
    prompts = [{"prompt_token_ids": _prompt(llm, task, language), "multi_modal_data": {"audio": (c, RATE)}}
               for c in clips]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_equals_transformers_for_short_clips_in_one_batch(llm, reference):
    clips = [_clip(1.5, 0), _clip(4.0, 1), _clip(9.0, 2)]
    assert _generate(llm, clips) == [reference(c) for c in clips]


def test_greedy_equals_transformers_for_a_clip_of_almost_30_seconds(llm, reference):
    clip = _clip(29.5, 3)
    assert _generate(llm, [clip]) == [reference(clip)]


@pytest.mark.parametrize(("task", "language"), [("translate", "de"), ("transcribe", "fr")])
def test_greedy_equals_transformers_for_each_task_and_language(llm, reference, task, language):
    clip = _clip(3.0, 4)
    assert _generate(llm, [clip], task, language) == [reference(clip, task, language)]


def test_long_audio_cut_at_quiet_points_decodes_each_clip_as_transformers(llm, reference):
    audio = np.concatenate([_clip(29.6, 5), np.zeros(RATE // 5, np.float32), _clip(25.0, 6)])
    clips = split_audio(audio, RATE)
    assert len(clips) == 2 and 29.0 <= clips[1].offset / RATE <= 30.0
    assert _generate(llm, [c.samples for c in clips]) == [reference(c.samples) for c in clips]


def test_batched_equals_unbatched(llm):
    clips = [_clip(2.0, 7), _clip(6.0, 8), _clip(12.0, 9)]
    together = _generate(llm, clips)
    assert together == [_generate(llm, [c])[0] for c in clips]


def test_audio_over_30_seconds_in_one_prompt_is_refused(llm):
    with pytest.raises(ValueError, match="at most 30 s"):
        _generate(llm, [_clip(31.0, 10)])


def _store(llm):
    return llm.engine.executor.runner.hook("cross_attn")


def test_cross_attention_kv_is_made_once_per_request_not_per_step(llm, monkeypatch):
    model = llm.engine.executor.runner.model
    encoded = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda modality, items: encoded.extend(items) or encode(modality, items))
    outputs = _generate(llm, [_clip(2.0, 11), _clip(3.0, 12)])
    assert all(len(tokens) == MAX_TOKENS for tokens in outputs)  # many decode steps each
    assert len(encoded) == 2


def test_a_finished_request_frees_its_cross_attention_kv(llm):
    _generate(llm, [_clip(2.0, 13), _clip(3.0, 14)])
    _generate(llm, [_clip(1.0, 15)])  # its first step tells the runner the earlier two finished
    assert len(_store(llm).entries) <= 1


def test_requests_beyond_the_cross_attention_budget_wait_and_decode_the_same(checkpoint, llm, monkeypatch):
    from loomserve import LLM

    one_request = 2 * 3 * 1500 * 32 * 4  # K and V x decoder layers x encoder positions x d_model x float32
    tight = LLM(checkpoint, encoder_cache_memory=one_request)
    store = _store(tight)
    most = []
    prepare = store.prepare
    monkeypatch.setattr(store, "prepare", lambda step, batch: most.append(len(batch.requests)) or prepare(step, batch))
    clips = [_clip(2.0, 16), _clip(4.0, 17), _clip(6.0, 18)]
    assert _generate(tight, clips) == _generate(llm, clips)
    assert max(most) == 1


def test_a_prompt_without_audio_is_refused_before_the_engine(llm):
    with pytest.raises(ValueError, match="one audio clip"):
        llm.generate({"prompt_token_ids": _prompt(llm)}, SamplingParams(temperature=0.0, max_tokens=4))
    assert _generate(llm, [_clip(1.0, 19)])  # the engine still serves
