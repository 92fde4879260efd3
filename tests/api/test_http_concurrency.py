"""Many requests at once share the engine's batches and get the answers they would get alone."""

from __future__ import annotations

import asyncio

import openai

PROMPTS = [f"Request number {i} says" + " hello" * i for i in range(12)]


async def _answer(client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool) -> str:
    args = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    if not stream:
        return (await client.completions.create(**args)).choices[0].text
    return "".join([chunk.choices[0].text async for chunk in await client.completions.create(**args, stream=True)])


async def _all_at_once(server) -> list[str]:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        return await asyncio.gather(*(_answer(client, server.model, p, i % 2 == 0) for i, p in enumerate(PROMPTS)))


def test_concurrent_requests_equal_sequential_ones(server, client):
    alone = [
        client.completions.create(
            model=server.model, prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        ).choices[0].text
        for p in PROMPTS
    ]
    assert asyncio.run(_all_at_once(server)) == alone
