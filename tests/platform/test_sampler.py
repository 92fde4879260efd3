"""Sampler: greedy, temperature, filters, penalties, min_tokens, seeds and logprobs."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from loomserve.platform.input_batch import RequestState
from loomserve.platform.request import SamplingParams
from loomserve.platform.sampler import Sampler, apply_penalties, build_sampling_metadata

CPU = torch.device("cpu")
EOS = 0


def make_request(prompt=(1, 2, 3), output=(), **params) -> RequestState:
    """The runner's state of a request that has landed `output`."""
    return RequestState("r", list(prompt), SamplingParams(**params), EOS, None, None, [], list(output))


def sample(logits: torch.Tensor, requests: list[RequestState]):
    """Sample each request's next output token, as the runner does."""
    for r in requests:
        r.num_sampled = r.num_output_tokens + 1
    meta = build_sampling_metadata(requests, logits.shape[1], CPU)
    return Sampler()(logits, meta)


def sample_counts(probs: list[float], n: int, **params) -> torch.Tensor:
    """How often each token is drawn from `probs` over n independent rows."""
    logits = torch.tensor(probs).log().expand(n, -1)
    tokens = sample(logits, [make_request(**params) for _ in range(n)]).sampled_token_ids
    return torch.bincount(tokens, minlength=len(probs))


def test_greedy_takes_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [make_request(temperature=0.0) for _ in range(8)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_greedy_rows_stay_greedy_in_mixed_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    requests = [make_request(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = sample(logits, requests)
    assert torch.equal(out.sampled_token_ids[1::2], logits[1::2].argmax(dim=-1))


def test_all_greedy_batch_leaves_rng_untouched():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    sample(torch.randn(4, 30, generator=torch.Generator()), [make_request(temperature=0.0)] * 4)
    assert torch.equal(torch.get_rng_state(), state)


def test_forward_leaves_input_logits_unchanged():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    sample(logits, [make_request(temperature=0.5, top_p=0.5, repetition_penalty=1.5, min_tokens=2)] * 2)
    assert torch.equal(logits, before)


def test_temperature_sampling_matches_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 4000
    counts = sample_counts(logits.exp().tolist(), n, temperature=0.7).float()
    expected = torch.softmax(logits / 0.7, dim=-1) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0  # 4 degrees of freedom: p < 1e-4; ignoring the temperature gives ~500


def test_top_k_one_equals_greedy():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(3))
    out = sample(logits, [make_request(temperature=1.5, top_k=1) for _ in range(16)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_top_k_keeps_the_k_most_likely():
    torch.manual_seed(0)
    counts = sample_counts([0.1, 0.4, 0.2, 0.3], 2000, top_k=2)
    assert counts.nonzero().flatten().tolist() == [1, 3]


def test_top_k_larger_than_vocab_keeps_everything():
    torch.manual_seed(0)
    counts = sample_counts([0.25, 0.25, 0.25, 0.25], 2000, top_k=1000)
    assert bool((counts > 0).all())


def test_top_p_keeps_the_nucleus_only():
    torch.manual_seed(0)
    counts = sample_counts([0.05, 0.5, 0.15, 0.3], 2000, top_p=0.7)
    assert counts.nonzero().flatten().tolist() == [1, 3]  # 0.5 + 0.3 is the smallest set reaching 0.7


def test_top_k_and_top_p_together_apply_both():
    torch.manual_seed(0)
    counts = sample_counts([0.4, 0.3, 0.2, 0.1], 2000, top_k=3, top_p=0.75)
    # Either filter alone keeps [0, 1, 2]; top-p over the renormalized top 3 (.44, .33, .22) drops 2.
    assert counts.nonzero().flatten().tolist() == [0, 1]


def test_min_p_drops_tokens_below_fraction_of_top():
    torch.manual_seed(0)
    counts = sample_counts([0.5, 0.05, 0.3, 0.15], 2000, min_p=0.2)
    assert counts.nonzero().flatten().tolist() == [0, 2, 3]  # 0.05 < 0.2 * 0.5


def test_repetition_penalty_matches_transformers():
    vocab = 12
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4)) * 3
    rows = [((1, 5, 5, 7), (2, 5), 1.3), ((0, 3), (11, 4, 4), 0.8), ((6,), (), 2.0)]
    requests = [make_request(prompt=p, output=o, repetition_penalty=pen) for p, o, pen in rows]
    meta = build_sampling_metadata(requests, vocab, CPU)
    ours = apply_penalties(logits.clone(), meta)
    for i, (prompt, output, penalty) in enumerate(rows):
        input_ids = torch.tensor([prompt + output])
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[i : i + 1].clone())
        assert torch.equal(ours[i], theirs[0])


def test_presence_and_frequency_penalties_use_output_token_counts():
    vocab = 8
    request = make_request(prompt=(1, 2), output=(3, 3, 4), frequency_penalty=0.5, presence_penalty=0.25)
    meta = build_sampling_metadata([request], vocab, CPU)
    penalized = apply_penalties(torch.zeros(1, vocab), meta)[0]
    expected = torch.zeros(vocab)
    expected[3] = -(0.5 * 2 + 0.25)
    expected[4] = -(0.5 * 1 + 0.25)  # prompt tokens 1 and 2 are not penalized
    assert torch.equal(penalized, expected)


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 1.0, 8.0, 7.0, 2.0]])  # eos (0), then stop ids 2 and 3
    params = dict(temperature=0.0, min_tokens=3, stop_token_ids=[2, 3])
    short = sample(logits, [make_request(output=(1, 1), **params)]).sampled_token_ids
    done = sample(logits, [make_request(output=(1, 1, 1), **params)]).sampled_token_ids
    assert short.tolist() == [4] and done.tolist() == [EOS]


def test_min_tokens_leaves_eos_open_when_ignore_eos():
    logits = torch.tensor([[9.0, 1.0, 8.0]])
    request = make_request(temperature=0.0, min_tokens=3, stop_token_ids=[2], ignore_eos=True)
    assert sample(logits, [request]).sampled_token_ids.tolist() == [EOS]


def seeded_token(logits_row: torch.Tensor, batch_logits: torch.Tensor, row: int) -> int:
    """The token a seeded request draws at `row` of a batch of unseeded and other-seeded mates."""
    logits = batch_logits.clone()
    logits[row] = logits_row
    requests = [make_request(temperature=1.0, seed=7 if i % 2 else None) for i in range(len(logits))]
    requests[row] = make_request(temperature=1.0, seed=1234)
    return sample(logits, requests).sampled_token_ids[row].item()


def test_seeded_row_ignores_batch_mates_and_position():
    gen = torch.Generator().manual_seed(5)
    logits_row = torch.randn(1000, generator=gen) * 0.1  # nearly flat: the noise decides
    alone = sample(logits_row.unsqueeze(0), [make_request(temperature=1.0, seed=1234)]).sampled_token_ids
    for row, batch in [(0, 3), (2, 5), (4, 5)]:
        torch.manual_seed(row)
        assert seeded_token(logits_row, torch.randn(batch, 1000, generator=gen), row) == alone.item()


def generate_seeded(logits: torch.Tensor, steps: int, output=()) -> list[int]:
    """Feed a seeded request `steps` tokens from fixed per-step logits, as a decode loop would."""
    request = make_request(temperature=1.0, seed=99, output=output)
    while request.num_output_tokens < steps:
        step_logits = logits[request.num_output_tokens].unsqueeze(0)
        request.output_token_ids.append(sample(step_logits, [request]).sampled_token_ids.item())
    return request.output_token_ids


def test_seeded_sequence_reproducible_across_runs_and_recompute():
    logits = torch.randn(12, 500, generator=torch.Generator().manual_seed(6)) * 0.1
    torch.manual_seed(0)
    first = generate_seeded(logits, 12)
    torch.manual_seed(1)
    assert generate_seeded(logits, 12) == first
    assert generate_seeded(logits, 12, output=first[:5]) == first  # resumed after a preemption


def test_seeded_request_draws_fresh_noise_each_step():
    flat = torch.zeros(12, 500)
    assert len(set(generate_seeded(flat, 12))) > 6


def test_logprobs_are_raw_with_sorted_top_k_and_rank():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(8))
    logits[:, EOS] = 10.0  # most likely, but min_tokens bans it for row 0,
    logits[:, 5] = 9.0  # so greedy row 0 takes the 2nd
    requests = [
        make_request(temperature=0.0, min_tokens=1, logprobs=4, repetition_penalty=1.2),
        make_request(temperature=0.8, logprobs=2),
        make_request(temperature=0.5, top_k=5),
    ]
    torch.manual_seed(0)
    out = sample(logits, requests)
    raw = torch.log_softmax(logits, dim=-1)
    sampled = out.sampled_token_ids
    assert out.logprob_token_ids.shape == (3, 5) and out.logprobs.shape == (3, 5)
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    assert torch.allclose(out.logprobs[:, 0], raw.gather(1, sampled.unsqueeze(1)).squeeze(1))
    top = raw.topk(4, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)
    assert torch.allclose(out.logprobs[:, 1:], top.values)
    assert bool((out.logprobs[:, 1:-1] >= out.logprobs[:, 2:]).all())
    expected_ranks = [int((raw[i] > raw[i, t]).sum()) + 1 for i, t in enumerate(sampled.tolist())]
    assert out.sampled_token_ranks.tolist() == expected_ranks
    assert expected_ranks[0] == 2


def test_no_logprobs_requested_returns_none():
    out = sample(torch.randn(2, 10), [make_request(temperature=0.0)] * 2)
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_token_ranks is None


@pytest.mark.parametrize("seed", [-5, 2**70])
def test_any_integer_seed_is_accepted(seed):
    out = sample(torch.zeros(1, 10), [make_request(temperature=1.0, seed=seed)])
    assert 0 <= out.sampled_token_ids.item() < 10


def test_tiny_top_p_still_keeps_the_top_token():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(9))
    out = sample(logits, [make_request(top_p=1e-9) for _ in range(8)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
