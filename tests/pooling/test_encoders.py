"""Tiny BERT and XLM-R encoders on the engine equal sentence-transformers and transformers: embedders (mean and
CLS pooling), cross-encoders (scores and rerank order), multi-label classifiers, token-level (ALL, STEP) pooling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from loomserve import LLM, PoolingParams
from loomserve.pooling.scoring import rerank_order
from loomserve.testing.pooling_checkpoints import tiny_encoder

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "She sells sea shells by the sea shore.",
    "Paris",
    "A journey of a thousand miles begins with a single step.",
    "Grüße aus München: Straße, Mädchen, schön, über.",
]


@pytest.fixture(scope="module", params=[("bert", "mean"), ("xlm-roberta", "cls")], ids=["bert-mean", "xlmr-cls"])
def embedder(request) -> str:
    family, pooling = request.param
    return str(tiny_encoder(family, pooling_mode=pooling))


@pytest.fixture(scope="module")
def cross_encoder(cross_encoder_path) -> tuple[str, LLM]:
    return cross_encoder_path, LLM(cross_encoder_path)


def test_embedder_equals_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    want = torch.from_numpy(SentenceTransformer(embedder, device="cpu").encode(DOCUMENTS))
    got = torch.tensor([o.outputs.embedding for o in LLM(embedder).embed(DOCUMENTS)])
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99999
    assert (got - want).abs().max() <= 1e-5


def test_cross_encoder_scores_equal_sentence_transformers(cross_encoder):
    from sentence_transformers import CrossEncoder

    path, llm = cross_encoder
    want = CrossEncoder(path, device="cpu").predict([(QUERY, d) for d in DOCUMENTS])
    got = [o.outputs.score for o in llm.score(QUERY, DOCUMENTS)]
    assert got == pytest.approx(want.tolist(), abs=1e-6)
    assert len(set(got)) == len(got)  # distinct scores, so the order below means something


def test_score_pairs_one_to_one_and_many_to_many(cross_encoder):
    _, llm = cross_encoder
    one_to_many = [o.outputs.score for o in llm.score(QUERY, DOCUMENTS)]
    zipped = [o.outputs.score for o in llm.score([QUERY] * len(DOCUMENTS), DOCUMENTS)]
    single = [llm.score(QUERY, d)[0].outputs.score for d in DOCUMENTS]
    assert zipped == pytest.approx(one_to_many, abs=1e-6) and single == pytest.approx(one_to_many, abs=1e-6)
    with pytest.raises(ValueError, match="text_1 has 2 texts and text_2 has 5"):
        llm.score([QUERY, QUERY], DOCUMENTS)


def test_cross_encoder_pairs_carry_segment_ids_for_bert():
    path = str(tiny_encoder("bert", head="classify"))
    llm = LLM(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    pair = tokenizer(QUERY, DOCUMENTS[0], return_tensors="pt")
    assert pair["token_type_ids"].any()  # the second text is segment 1: dropping segment ids changes the score
    want = torch.sigmoid(model(**pair).logits)[0, 0].item()
    without_segments = torch.sigmoid(model(input_ids=pair["input_ids"]).logits)[0, 0].item()
    got = llm.score(QUERY, DOCUMENTS[0])[0].outputs.score
    assert got == pytest.approx(want, abs=1e-6) and got != pytest.approx(without_segments, abs=1e-4)


def test_rerank_order_and_top_n(cross_encoder):
    _, llm = cross_encoder
    scores = [o.outputs.score for o in llm.score(QUERY, DOCUMENTS)]
    order = rerank_order(scores)
    assert sorted(scores, reverse=True) == [scores[i] for i in order]
    assert rerank_order(scores, top_n=2) == order[:2]
    assert rerank_order([0.5, 0.9, 0.5], top_n=None) == [1, 0, 2]  # ties keep the input order


def test_multi_label_classifier_applies_softmax_by_default():
    path = str(tiny_encoder("bert", head="classify", num_labels=3, sentence_transformers=False))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    want = torch.softmax(model(**tokenizer(DOCUMENTS, padding=True, return_tensors="pt")).logits, dim=-1)
    got = torch.tensor([o.outputs.probs for o in LLM(path).classify(DOCUMENTS)])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(len(DOCUMENTS)))


def test_classifier_follows_the_activation_sentence_transformers_saved():
    path = str(tiny_encoder("bert", head="classify", num_labels=3))  # CrossEncoder saves Identity for 3 labels
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    want = model(**tokenizer(DOCUMENTS, padding=True, return_tensors="pt")).logits
    got = torch.tensor([o.outputs.probs for o in LLM(path).classify(DOCUMENTS)])
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="one label; this one has 3"):
        LLM(path).score(QUERY, DOCUMENTS)


def test_all_pooling_returns_every_token_state_and_step_the_tagged_ones():
    path = str(tiny_encoder("xlm-roberta"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    llm = LLM(path)
    ids = tokenizer(DOCUMENTS[0], return_tensors="pt")
    want = model(**ids).last_hidden_state[0]  # [n, hidden]
    [every] = llm.encode(DOCUMENTS[0], PoolingParams(pooling_type="ALL", normalize=False))
    assert every.outputs.data.shape == want.shape and torch.allclose(every.outputs.data, want, atol=1e-5)
    tag = ids["input_ids"][0, 3].item()
    [steps] = llm.encode(DOCUMENTS[0], PoolingParams(pooling_type="STEP", step_tag_id=tag, returned_token_ids=[0, 5],
                                                     normalize=False))
    tagged = ids["input_ids"][0] == tag
    assert torch.allclose(steps.outputs.data, want[tagged][:, [0, 5]], atol=1e-5)


def test_xlm_roberta_context_leaves_out_the_padding_offset():
    path = str(tiny_encoder("xlm-roberta"))  # 130 learned positions, numbered from padding_idx + 1 = 2
    assert LLM(path).config.model_config.max_model_len == 128


def test_encoder_prompt_over_the_step_budget_is_refused():
    llm = LLM(str(tiny_encoder("bert")), max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="whole in one step of at most 8 tokens"):
        llm.embed(DOCUMENTS[0])
    assert len(llm.embed("a b")[0].outputs.embedding) == 32


def test_pooling_params_the_model_cannot_take_are_refused_before_the_engine_sees_them():
    llm = LLM(str(tiny_encoder("bert")))
    n = len(llm.get_tokenizer().encode("a b"))
    with pytest.raises(ValueError, match=r"segment id in \[0, 2\)"):
        llm.encode("a b", PoolingParams(token_type_ids=[0] * (n - 1) + [2]))
    with pytest.raises(ValueError, match=r"returned_token_ids must be in \[0, 32\)"):
        llm.encode("a b", PoolingParams(pooling_type="STEP", returned_token_ids=[40]))
    assert llm.encode("a b", PoolingParams(token_type_ids=[0] * (n - 1) + [1]))[0].outputs.data.shape == (32,)
