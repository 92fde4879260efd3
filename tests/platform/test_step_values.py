"""The step as a value: the scheduler tells the runner about a request in full once and then only its diffs, a
preempted request comes back with its whole block table, steps and results survive their wire form, and the
engine takes any number of tokens per request from one step (what speculative decoding will hand it): accounting,
stop conditions, stop strings, detokenization and logprobs."""

from __future__ import annotations

from typing import Any

import torch

from loomserve import LLM, SamplingParams
from loomserve.adapters.request import LoRARequest
from loomserve.modalities.inputs import MultiModalItem, PlaceholderRange
from loomserve.platform import wire
from loomserve.platform.config import CacheConfig, SchedulerConfig
from loomserve.platform.engine import EngineCore
from loomserve.platform.request import Request
from loomserve.platform.scheduler import Scheduler
from loomserve.platform.step import NewRequest, ScheduledRequest, ScheduledStep, StepResult


def scheduler(num_blocks: int = 64, budget: int = 32) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8),
                     CacheConfig(block_size=4, enable_prefix_caching=False), 256, num_blocks)


def land(s: Scheduler, step: ScheduledStep) -> None:
    s.update_from_output(step, StepResult({x.request_id: [7] for x in step.scheduled if x.samples}))


def test_a_request_is_sent_in_full_once_then_as_new_blocks_only():
    s = scheduler()
    s.add_request(Request("a", list(range(10)), SamplingParams(max_tokens=8, ignore_eos=True)))
    first = s.schedule()
    assert [n.request_id for n in first.new_requests] == ["a"] and first.new_requests[0].prompt_token_ids == list(
        range(10))
    assert first.scheduled[0].new_block_ids == s.kv.block_ids("a")  # 3 blocks for 10 tokens
    land(s, first)
    second = s.schedule()  # position 10: still in the third block
    assert second.new_requests == [] and second.scheduled[0].new_block_ids == []
    land(s, second)
    land(s, s.schedule())
    fourth = s.schedule()  # position 12: a fourth block
    assert fourth.scheduled[0].new_block_ids == s.kv.block_ids("a")[3:] and len(fourth.scheduled[0].new_block_ids) == 1


def test_a_preempted_request_resumes_with_its_whole_block_table():
    s = scheduler(num_blocks=6, budget=64)  # each needs 5 blocks of 4 tokens at its end: only one fits
    for request_id in "ab":
        s.add_request(Request(request_id, list(range(7)), SamplingParams(max_tokens=10, ignore_eos=True)))
    step = s.schedule()
    while not step.preempted_ids:
        land(s, step)
        step = s.schedule()
    assert step.preempted_ids == ["b"]
    land(s, step)
    while "a" in s.requests:
        step = s.schedule()
        land(s, step)
    resumed = next(x for x in s.schedule().scheduled if x.request_id == "b")
    assert resumed.resumed and resumed.start == 0 and resumed.new_block_ids == s.kv.block_ids("b")


def test_finished_requests_are_named_once_in_the_next_step():
    s = scheduler()
    s.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True)))
    land(s, s.schedule())
    assert s.schedule().finished_ids == ["a"]
    assert s.schedule().finished_ids == []


def test_steps_and_results_survive_their_wire_form():
    pixels = torch.randn(4, 6).to(torch.bfloat16)
    item = MultiModalItem("image", "hash", PlaceholderRange(1, 2), {"pixel_values": pixels}, {"fps": 2.0})
    new = NewRequest("r", [1, 2, 3], SamplingParams(temperature=0.5, stop=["x"], seed=3), 9,
                     lora_request=LoRARequest("sql", 2, "/a/sql"), mm_items=[item])
    features = {"lora": {"active": [["sql", 2, "/a/sql"]], "load": []}, "spec": {"propose": False}}
    step = ScheduledStep([new], [ScheduledRequest("r", 3, 0, [5, 6], samples=True, spec_token_ids=[7, 8])], ["gone"],
                         ["later"], features)
    back = wire.decode(wire.encode(step), ScheduledStep)
    assert back.scheduled == step.scheduled and back.finished_ids == ["gone"] and back.preempted_ids == ["later"]
    assert back.features == step.features
    got = back.new_requests[0]
    assert got.sampling_params == new.sampling_params and got.lora_request == new.lora_request
    assert torch.equal(got.mm_items[0].data["pixel_values"], pixels) and got.mm_items[0].meta == {"fps": 2.0}
    result = StepResult({"r": [4, 5]}, {"r": [([4, 1], [-0.5, -1.0], 1), ([5], [-0.25], 1)]},
                        {"p": torch.arange(3.0)}, {"lora": {"cached": [2], "failed": {}}, "spec": {"r": [6, 7]}})
    again = wire.decode(wire.encode(result), StepResult)
    assert again.sampled == result.sampled and again.features == result.features
    assert [list(x) for x in again.logprobs["r"]] == [list(x) for x in result.logprobs["r"]]
    assert torch.equal(again.pooled["p"], result.pooled["p"])


class ScriptedExecutor:
    """Stands where a speculating runner will: every sampling request gets the next `per_step` tokens of `script`
    at once (each with its logprob); it checks that the steps tell it what a runner needs."""

    def __init__(self, script: list[int], per_step: int) -> None:
        self.script, self.per_step = script, per_step
        self.prompt_lens: dict[str, int] = {}
        self.known: dict[str, int] = {}  # request id -> tokens it holds (prompt + landed)
        self.num_new_tokens: list[int] = []

    def measure_kv_blocks(self) -> int:
        return 512  # 2,048 tokens of 4: the checkpoint's whole context

    def init_kv_cache(self, num_blocks: int) -> None:
        pass

    def launch(self, step: ScheduledStep) -> ScheduledStep:
        for new in step.new_requests:
            self.prompt_lens[new.request_id] = self.known[new.request_id] = len(new.prompt_token_ids)
        return step

    def collect(self, step: ScheduledStep) -> StepResult:
        result = StepResult()
        for s in step.scheduled:
            assert s.start + s.num_new_tokens <= self.known[s.request_id]  # only tokens it was told of
            self.num_new_tokens.append(s.num_new_tokens)
            if s.samples:
                done = self.known[s.request_id] - self.prompt_lens[s.request_id]
                tokens = self.script[done : done + self.per_step]
                result.sampled[s.request_id] = tokens
                result.logprobs[s.request_id] = [([t], [-0.5], 1) for t in tokens]
                self.known[s.request_id] += len(tokens)
        return result

    def call(self, feature: str, method: str, *args: Any) -> Any:
        raise ValueError(f"no {feature}")

    def shutdown(self) -> None:
        pass


def scripted_llm(checkpoint: str, per_step: int) -> tuple[LLM, ScriptedExecutor, list[int]]:
    llm = LLM(checkpoint, block_size=4, kv_cache_memory="8MiB")
    tokenizer = llm.get_tokenizer()
    script = tokenizer.encode(" one two three four five six seven eight nine ten eleven", add_special_tokens=False)
    executor = ScriptedExecutor(script, per_step)
    llm.engine = EngineCore(llm.config, executor=executor)
    return llm, executor, script


def test_several_tokens_a_step_reach_the_output_in_order_and_stop_at_max_tokens(qwen2_checkpoint):
    llm, executor, script = scripted_llm(qwen2_checkpoint, per_step=3)
    out = llm.generate("count:", SamplingParams(max_tokens=7, ignore_eos=True, logprobs=0))[0].outputs[0]
    assert out.token_ids == script[:7] and out.finish_reason == "length"  # the third step's last two are dropped
    assert out.text == llm.get_tokenizer().decode(script[:7])
    assert [list(lp) for lp in out.logprobs] == [[t] for t in script[:7]] and out.cumulative_logprob == -3.5
    # the prompt, then each step computes the KV of the tokens the last one brought
    assert executor.num_new_tokens == [executor.prompt_lens["0"], 3, 3]


def test_a_stop_string_inside_a_step_s_tokens_ends_the_text_there(qwen2_checkpoint):
    llm, _, _ = scripted_llm(qwen2_checkpoint, per_step=4)
    out = llm.generate("count:", SamplingParams(max_tokens=30, ignore_eos=True, stop=[" five"]))[0].outputs[0]
    assert out.text == " one two three four" and out.finish_reason == "stop" and out.stop_reason == " five"


def test_a_stop_token_inside_a_step_s_tokens_drops_those_after_it(qwen2_checkpoint):
    llm, _, script = scripted_llm(qwen2_checkpoint, per_step=4)
    out = llm.generate("count:", SamplingParams(max_tokens=30, stop_token_ids=[script[5]]))[0].outputs[0]
    assert out.token_ids == script[:6] and out.finish_reason == "stop" and out.stop_reason == script[5]
