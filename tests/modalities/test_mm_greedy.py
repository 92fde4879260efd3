"""The engine's greedy output equals transformers' token for token for every multimodal family: one image, two
images of different sizes, an image in a second turn, videos, audio clips; in batches mixed with text-only
requests, with token budgets that split an item across steps, and with prefix-cache and encoder-cache hits."""

from __future__ import annotations

import functools

import pytest
from media_samples import noise_image, noise_video, png_data_url, tone
from mm_reference import MAX_TOKENS, hf_greedy, ids_of, image_prompt, tokenizer

from loomserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
VISION = ["qwen2_vl", "qwen2_5_vl", "llava"]
QWEN_VL = ["qwen2_vl", "qwen2_5_vl"]

SMALL = noise_image(56, 56, seed=1)
LARGE = noise_image(112, 84, seed=2)  # Qwen-VL: 12 tokens; LLaVA: cropped to 56x56, 16 tokens
OTHER_SMALL = noise_image(56, 56, seed=3)  # same size as SMALL, other pixels
VIDEO = noise_video(6, 56, 84, seed=4)  # 3 temporal patches: frames past the second keep to themselves
CLIP_A, CLIP_B = tone(1.0, seed=0), tone(1.6, seed=1)


def audio_prompt(n: int, question: str = "What is that sound?") -> str:
    audios = "".join(f"Audio {i + 1}: <|audio_bos|><|AUDIO|><|audio_eos|>\n" for i in range(n))
    return f"<|im_start|>user\n{audios}{question}<|im_end|>\n<|im_start|>assistant\n"


@functools.cache
def engine(path: str, **kwargs) -> LLM:
    return LLM(path, block_size=4, kv_cache_memory="8MiB", **kwargs)


def run(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("family", VISION)
def test_one_image(mm_checkpoint, family):
    path = mm_checkpoint(family)
    ids = ids_of(path, image_prompt(family, 1))
    [out] = run(engine(path), [{"prompt_token_ids": ids, "multi_modal_data": {"image": SMALL}}])
    assert out == hf_greedy(path, ids, images=[SMALL])


@pytest.mark.parametrize("family", VISION)
def test_two_images_of_different_sizes(mm_checkpoint, family):
    path = mm_checkpoint(family)
    ids = ids_of(path, image_prompt(family, 2, "Compare them."))
    [out] = run(engine(path), [{"prompt_token_ids": ids, "multi_modal_data": {"image": [LARGE, SMALL]}}])
    assert out == hf_greedy(path, ids, images=[LARGE, SMALL])


@pytest.mark.parametrize("family", VISION)
def test_image_in_a_second_turn_through_chat_with_data_urls(mm_checkpoint, family):
    path = mm_checkpoint(family)
    messages = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(LARGE)}},
                                     {"type": "text", "text": "What is this?"}]},
    ]
    [out] = engine(path).chat(messages, GREEDY)
    parts = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    template = [*messages[:2], {"role": "user", "content": parts}]
    text = tokenizer(path).apply_chat_template(template, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(path).encode(text, add_special_tokens=False)
    assert out.outputs[0].token_ids == hf_greedy(path, ids, images=[LARGE])


@pytest.mark.parametrize("family", VISION)
def test_batch_mixed_with_text_only_requests(mm_checkpoint, family):
    path = mm_checkpoint(family)
    text_ids = ids_of(path, image_prompt(family, 0, "Tell me a story about the sea."))
    one = ids_of(path, image_prompt(family, 1))
    two = ids_of(path, image_prompt(family, 2))
    outs = run(engine(path), [
        {"prompt_token_ids": one, "multi_modal_data": {"image": [LARGE]}},
        {"prompt_token_ids": text_ids},
        {"prompt_token_ids": two, "multi_modal_data": {"image": [SMALL, LARGE]}},
    ])
    assert outs == [hf_greedy(path, one, images=[LARGE]), hf_greedy(path, text_ids),
                    hf_greedy(path, two, images=[SMALL, LARGE])]


@pytest.mark.parametrize("family", VISION)
def test_token_budget_splitting_an_image_across_steps(mm_checkpoint, family):
    path = mm_checkpoint(family)
    llm = engine(path, max_num_batched_tokens=5)
    ids = ids_of(path, image_prompt(family, 2))
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"image": [LARGE, SMALL]}},
               {"prompt_token_ids": ids_of(path, image_prompt(family, 0, "Just text."))}]
    outs = run(llm, prompts)
    assert outs[0] == hf_greedy(path, ids, images=[LARGE, SMALL])
    assert outs[1] == hf_greedy(path, prompts[1]["prompt_token_ids"])
    assert llm.engine.scheduler.hook("mm").num_encoded == 2  # each image encoded once, though split


@pytest.mark.parametrize("family", VISION)
def test_repeated_image_hits_the_prefix_cache_and_another_image_of_the_same_size_never_does(mm_checkpoint, family):
    path = mm_checkpoint(family)
    llm = engine(path, enable_prefix_caching=True, max_num_batched_tokens=2048, max_num_seqs=8)
    ids = ids_of(path, image_prompt(family, 1, "Describe the picture in detail please."))
    first = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": SMALL}}, GREEDY)[0]
    encoded = llm.engine.scheduler.hook("mm").num_encoded
    again = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": SMALL}}, GREEDY)[0]
    expected = hf_greedy(path, ids, images=[SMALL])
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == expected
    placeholder = tokenizer(path).convert_tokens_to_ids("<image>" if family == "llava" else "<|image_pad|>")
    start = first.prompt_token_ids.index(placeholder)
    assert again.num_cached_tokens >= (len(first.prompt_token_ids) - 1) // 4 * 4 > start
    assert llm.engine.scheduler.hook("mm").num_encoded == encoded  # all inside cached blocks: no encoder run

    other = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": OTHER_SMALL}}, GREEDY)[0]
    assert other.prompt_token_ids == first.prompt_token_ids  # same tokens, different pixels
    assert other.num_cached_tokens <= start  # only the blocks before the image
    assert other.outputs[0].token_ids == hf_greedy(path, ids, images=[OTHER_SMALL])


@pytest.mark.parametrize("family", VISION)
def test_encoder_cache_serves_the_same_image_in_another_prompt(mm_checkpoint, family):
    path = mm_checkpoint(family)
    llm = engine(path, enable_prefix_caching=False)
    before = llm.engine.scheduler.hook("mm").num_encoded
    first = ids_of(path, image_prompt(family, 1, "First question?"))
    second = ids_of(path, image_prompt(family, 1, "A different, longer second question?"))
    outs = run(llm, [{"prompt_token_ids": first, "multi_modal_data": {"image": LARGE}}])
    outs += run(llm, [{"prompt_token_ids": second, "multi_modal_data": {"image": LARGE}}])
    assert outs == [hf_greedy(path, first, images=[LARGE]), hf_greedy(path, second, images=[LARGE])]
    assert llm.engine.scheduler.hook("mm").num_encoded - before <= 1


def test_preempted_requests_recompute_their_media_with_unchanged_output(mm_checkpoint):
    path = mm_checkpoint("qwen2_vl")
    # 16 blocks of 4 tokens; prompts of 23, 35 and 28 tokens that grow by 10: decoding must preempt some.
    llm = LLM(path, block_size=4, num_gpu_blocks_override=16, max_model_len=48, enable_prefix_caching=False)
    prompts = [ids_of(path, image_prompt("qwen2_vl", 1, q)) for q in ("One?", "Two two?", "Three three three?")]
    images = [[SMALL], [LARGE], [OTHER_SMALL]]
    outs = run(llm, [{"prompt_token_ids": p, "multi_modal_data": {"image": i}} for p, i in zip(prompts, images)])
    assert outs == [hf_greedy(path, p, images=i) for p, i in zip(prompts, images)]
    assert llm.engine.scheduler.total_preemptions > 0


@pytest.mark.parametrize("family", QWEN_VL)
def test_video(mm_checkpoint, family):
    path = mm_checkpoint(family)
    text = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = ids_of(path, text)
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"video": VIDEO}}
    [out] = run(engine(path, max_num_batched_tokens=7), [prompt])
    assert out == hf_greedy(path, ids, videos=[VIDEO])


@pytest.mark.parametrize("family", QWEN_VL)
def test_image_and_video_in_one_prompt(mm_checkpoint, family):
    path = mm_checkpoint(family)
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and<|vision_start|><|video_pad|>"
            "<|vision_end|>Same scene?<|im_end|>\n<|im_start|>assistant\n")
    ids = ids_of(path, text)
    [out] = run(engine(path), [{"prompt_token_ids": ids, "multi_modal_data": {"image": LARGE, "video": VIDEO}}])
    assert out == hf_greedy(path, ids, images=[LARGE], videos=[VIDEO])


def test_audio_clips_alone_mixed_split_and_repeated(mm_checkpoint):
    path = mm_checkpoint("qwen2_audio")
    one, two = ids_of(path, audio_prompt(1)), ids_of(path, audio_prompt(2, "Which is longer?"))
    text = ids_of(path, audio_prompt(0, "Say something nice."))
    prompts = [
        {"prompt_token_ids": one, "multi_modal_data": {"audio": (CLIP_A, 16000)}},
        {"prompt_token_ids": text},
        {"prompt_token_ids": two, "multi_modal_data": {"audio": [(CLIP_B, 16000), CLIP_A]}},
    ]
    expected = [hf_greedy(path, one, audios=[CLIP_A]), hf_greedy(path, text),
                hf_greedy(path, two, audios=[CLIP_B, CLIP_A])]
    assert run(engine(path), prompts) == expected
    small_budget = engine(path, max_num_batched_tokens=6)
    assert run(small_budget, prompts) == expected
    again = small_budget.generate(prompts[:1], GREEDY)[0]
    assert again.outputs[0].token_ids == expected[0]
    assert again.num_cached_tokens >= (len(again.prompt_token_ids) - 1) // 4 * 4


def test_images_and_text_sharing_steps_in_a_runner_process_equal_transformers(mm_checkpoint):
    """The runner in its own process: media items reach it inside the step, encoded there."""
    path = mm_checkpoint("qwen2_vl")
    text_ids = ids_of(path, image_prompt("qwen2_vl", 0, "Tell me a story about the sea."))
    two = ids_of(path, image_prompt("qwen2_vl", 2))
    llm = LLM(path, block_size=4, kv_cache_memory="8MiB", max_num_batched_tokens=16,
              distributed_executor_backend="mp")
    try:
        outs = run(llm, [{"prompt_token_ids": two, "multi_modal_data": {"image": [SMALL, LARGE]}},
                         {"prompt_token_ids": text_ids}])
    finally:
        llm.engine.shutdown()
    assert outs == [hf_greedy(path, two, images=[SMALL, LARGE]), hf_greedy(path, text_ids)]
