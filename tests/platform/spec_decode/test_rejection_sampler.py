"""The rejection sampler keeps the target's distribution exactly, whatever the draft, and greedy rows emit exactly
what sequential greedy sampling would."""

from __future__ import annotations

import torch

from loomserve.platform.input_batch import RequestState
from loomserve.platform.request import SamplingParams
from loomserve.platform.sampler import Sampler, build_sampling_metadata
from loomserve.platform.spec_decode.rejection_sampler import DraftBatch, RejectionSampler, verify_rows

CPU = torch.device("cpu")
V = 5
CHI2_LIMIT = 25.0  # at most 4 degrees of freedom: p < 1e-4


def make_state(output=(), **params) -> RequestState:
    state = RequestState("r", [1, 2, 3], SamplingParams(**params), 0, None, None, [], list(output))
    state.num_sampled = state.num_output_tokens + 1  # as the runner counts while a step runs
    return state


def verify(logits, states, drafts, probs=None, sampler=None):
    """Run the rejection sampler over k + 1 rows per state; returns (row tokens, emitted per state, output)."""
    meta = build_sampling_metadata(verify_rows(states, drafts), V, CPU)
    batch = DraftBatch([len(d) for d in drafts], torch.tensor([t for d in drafts for t in d]), probs)
    out, emitted = (sampler or RejectionSampler())(logits, meta, batch)
    return out.sampled_token_ids, emitted, out


def filtered(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The distribution sampling draws from: softmax at the temperature over the top-k tokens."""
    kth = logits.topk(top_k).values[-1]
    return torch.softmax(torch.where(logits >= kth, logits, -float("inf")) / temperature, dim=-1)


def chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=V).float()
    expected = probs * len(tokens)
    seen = expected > 0
    assert counts[~seen].sum() == 0, "a token the target excludes was emitted"
    return (((counts - expected) ** 2)[seen] / expected[seen]).sum().item()


def test_a_differing_draft_keeps_the_targets_distribution_at_every_position():
    torch.manual_seed(0)
    n, params = 12000, dict(temperature=0.8, top_k=4)
    target = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0], [-0.3, 1.2, 0.4, 0.0, 0.9], [0.5, 0.5, 0.5, 0.5, 0.5]])
    q = torch.softmax(torch.tensor([[0.0, 2.0, 0.0, -1.0, 0.5], [1.5, -1.0, 0.0, 0.0, 0.0]]), dim=-1)  # differs
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True) for i in range(2)], dim=1)  # [n, 2]
    tokens, emitted, _ = verify(target.repeat(n, 1), [make_state(**params) for _ in range(n)], drafts.tolist(),
                                q.repeat(n, 1))
    rows = tokens.view(n, 3)
    assert chi2(rows[:, 0], filtered(target[0], **params)) < CHI2_LIMIT
    accepted = rows[:, 0] == drafts[:, 0]  # a recovered token never equals the draft it replaces
    assert torch.equal(accepted, emitted >= 2)
    assert chi2(rows[accepted, 1], filtered(target[1], **params)) < CHI2_LIMIT
    assert 0 < accepted.float().mean() < 1  # both branches ran


def test_point_mass_drafts_as_ngram_proposes_keep_the_distribution():
    torch.manual_seed(1)
    n = 12000
    target = torch.tensor([[0.3, 1.0, -0.2, 0.7, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    tokens, emitted, _ = verify(target.repeat(n, 1), [make_state(temperature=1.0) for _ in range(n)], [[3]] * n)
    assert chi2(tokens.view(n, 2)[:, 0], torch.softmax(target[0], dim=-1)) < CHI2_LIMIT


def sequential_greedy(logits: torch.Tensor, state: RequestState, drafts: list[int]) -> list[int]:
    """What plain greedy sampling emits position by position, stopping at the first token that is not the draft."""
    out = []
    for i in range(len(drafts) + 1):
        row = make_state(state.output_token_ids + out, **vars(state.sampling_params))
        token = Sampler()(logits[i : i + 1], build_sampling_metadata([row], V, CPU)).sampled_token_ids.item()
        out.append(token)
        if i == len(drafts) or token != drafts[i]:
            return out
    return out


def test_greedy_rows_emit_what_sequential_greedy_sampling_would_with_penalties_and_min_tokens():
    gen = torch.Generator().manual_seed(2)
    params = dict(temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.0, min_tokens=3, ignore_eos=False)
    for trial in range(20):
        logits = torch.randn(4, V, generator=gen) * 2
        state = make_state(output=[4], **params)
        # Drafts that agree with the plain greedy path for a while, then (maybe) not.
        path = sequential_greedy(logits, state, [0, 0, 0])
        drafts = (path + [1, 2, 3])[:3]
        if trial % 2:
            drafts[trial % 3] = (drafts[trial % 3] + 1) % V
        expected = sequential_greedy(logits, state, drafts)
        tokens, emitted, _ = verify(logits, [state], [drafts])
        assert tokens[: emitted.item()].tolist() == expected


def test_logprobs_are_the_raw_logits_at_each_emitted_position():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    tokens, emitted, out = verify(logits, [make_state(temperature=0.0, logprobs=2)], [logits[:2].argmax(1).tolist()])
    raw = logits.log_softmax(dim=-1)
    assert emitted.item() == 3
    assert torch.allclose(out.logprobs[:, 0], raw.gather(1, tokens[:, None])[:, 0])
    assert torch.allclose(out.logprobs[:, 1:], raw.topk(2).values)


def test_a_seeded_request_reproduces_its_tokens_whatever_shares_the_batch():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    seeded = [make_state(temperature=1.0, seed=7)]
    alone, _, _ = verify(logits, seeded, [[1, 2]])
    crowd = torch.cat([torch.randn(3, V), logits])
    together, _, _ = verify(crowd, [make_state(temperature=1.0)] + [make_state(temperature=1.0, seed=7)],
                            [[0, 0], [1, 2]])
    assert torch.equal(together[3:], alone)


def test_synthetic_acceptance_accepts_each_draft_with_the_given_probability():
    torch.manual_seed(5)
    n = 4000
    logits = torch.zeros(2 * n, V)
    _, emitted, _ = verify(logits, [make_state(temperature=0.0) for _ in range(n)], [[1]] * n,
                           sampler=RejectionSampler(synthetic_acceptance_rate=0.7))
    assert abs((emitted == 2).float().mean().item() - 0.7) < 0.03
