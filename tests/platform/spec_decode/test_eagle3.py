"""EAGLE-3: a head in the published layout is read right (its drafts equal a reference computation of the
architecture with transformers' Llama modules), greedy output with it equals no speculation whatever the batch,
budget or memory pressure, and heads that do not fit their target are refused before anything loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_spec_decode_greedy import ENGINE, GREEDY, PROMPTS, Counted, without_speculation
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from loomserve import LLM
from loomserve.platform.spec_decode.eagle3 import head_weights
from loomserve.testing.checkpoints import tiny_checkpoint
from loomserve.testing.eagle3_checkpoints import build_eagle3_head, tiny_eagle3_head

AUX_LAYERS = [1, 0, 1]  # the tiny target has 2 layers: vLLM's default (2, 1, -1) does not fit


@pytest.fixture(scope="module")
def head(qwen2_checkpoint) -> str:
    """A head whose draft vocabulary is the tokens the target emits on PROMPTS (EAGLE-3 takes its target's most
    frequent tokens), so some of its random guesses are right."""
    emitted = sorted({t for tokens in without_speculation(qwen2_checkpoint) for t in tokens})
    return str(tiny_eagle3_head(qwen2_checkpoint, aux_layer_ids=AUX_LAYERS, draft_token_ids=emitted))


def eagle3(head: str, k: int = 3) -> dict:
    return {"method": "eagle3", "model": head, "num_speculative_tokens": k}


class ReferenceHead(nn.Module):
    """The EAGLE-3 head as published, from transformers' Llama modules over a whole sequence (no cache): position i
    reads [input_layernorm(embed(token i + 1)) ; hidden_norm(h_i)] with h_i = fc(the target's chosen layers' inputs
    at i), or the head's own pre-norm output for positions past the target's."""

    def __init__(self, path: str, target: nn.Module) -> None:
        super().__init__()
        config = AutoConfig.from_pretrained(path)
        config._attn_implementation = "eager"
        hidden, tensors = config.hidden_size, load_file(f"{path}/model.safetensors")
        self.self_attn = LlamaAttention(config, layer_idx=0)
        for name in ("q_proj", "k_proj", "v_proj"):  # they read embeddings and hidden state side by side
            out_features = getattr(self.self_attn, name).out_features
            setattr(self.self_attn, name, nn.Linear(2 * hidden, out_features, bias=False))
        self.mlp = LlamaMLP(config)
        self.input_layernorm, self.hidden_norm, self.post_attention_layernorm, self.norm = (
            LlamaRMSNorm(hidden, config.rms_norm_eps) for _ in range(4))
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(config)
        state = {name.removeprefix("midlayer."): t for name, t in tensors.items() if name not in ("d2t", "t2d")}
        own = tensors.pop("embed_tokens.weight", None)
        self.embed = target.model.embed_tokens if own is None else nn.Embedding.from_pretrained(own)
        self.load_state_dict(state, strict=False)
        self.target_ids = torch.arange(config.draft_vocab_size) + tensors["d2t"]
        self.vocab_size = config.vocab_size

    def forward(self, next_tokens: list[int], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """next_tokens [L], hidden [L, hidden] -> (logits over the target vocabulary [L, V], pre-norm output)."""
        embeds = self.embed(torch.tensor(next_tokens))
        length = embeds.shape[0]
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)[None]  # [1, L, 2 * hidden]
        cos_sin = self.rotary(x, torch.arange(length)[None])
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        attn, _ = self.self_attn(x, position_embeddings=cos_sin, attention_mask=mask)
        residual = hidden + attn[0]
        prenorm = residual + self.mlp(self.post_attention_layernorm(residual))
        logits = torch.full((length, self.vocab_size), float("-inf"))
        logits[:, self.target_ids] = self.lm_head(self.norm(prenorm))
        return logits, prenorm


@torch.no_grad()
def reference_drafts(target: nn.Module, head: ReferenceHead, layers: list[int], tokens: list[int], k: int
                     ) -> list[int]:
    """The head's k greedy drafts after `tokens`: the inputs of the target's `layers` feed positions 0..L-2, then
    each draft extends the sequence with the head's own output as the hidden state."""
    states = target(torch.tensor([tokens]), output_hidden_states=True).hidden_states  # [i]: layer i's input
    hidden = head.fc(torch.cat([states[i][0] for i in layers], dim=-1))[:-1]  # [L - 1, hidden]
    next_tokens = tokens[1:]
    drafts = []
    for _ in range(k):
        logits, prenorm = head(next_tokens, hidden)
        drafts.append(int(logits[-1].argmax()))
        next_tokens = next_tokens + drafts[-1:]
        hidden = torch.cat([hidden, prenorm[-1:]])
    return drafts


def record_proposals(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """(a request's tokens, the drafts proposed after them) for every request given all k drafts, as they come."""
    proposer = llm.engine.executor.runner.hook("spec").proposer
    proposed = []
    propose = proposer.propose

    def recorded(states, caps, landed):
        drafts = propose(states, caps, landed)
        proposed.extend((s.prompt_token_ids + s.output_token_ids, d) for s, d in zip(states, drafts) if len(d) == 3)
        return drafts

    proposer.propose = recorded
    return proposed


@pytest.mark.parametrize(("family", "target_args", "layers", "head_args"), [
    ("qwen2", {}, AUX_LAYERS, {"aux_layer_ids": AUX_LAYERS}),
    ("llama", {"num_layers": 4}, [2, 2, 1], {"own_embeddings": True}),  # vLLM's default (2, L // 2, L - 3)
], ids=["chosen-layers", "default-layers-own-embeddings"])
def test_the_heads_drafts_equal_the_reference_architecture(family, target_args, layers, head_args):
    path = str(tiny_checkpoint(family, **target_args))
    head = str(tiny_eagle3_head(path, **head_args))
    llm = LLM(path, speculative_config=eagle3(head), max_num_batched_tokens=8, **ENGINE)
    proposed = record_proposals(llm)
    llm.generate(PROMPTS[:2], GREEDY)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = ReferenceHead(head, target)
    assert len(proposed) > 10
    for tokens, drafts in proposed[::3]:
        assert drafts == reference_drafts(target, reference, layers, tokens, 3)


@pytest.mark.parametrize("engine", [{}, {"async_scheduling": True}], ids=["batched", "async"])
def test_eagle3_greedy_equals_no_speculation(qwen2_checkpoint, head, engine):
    llm = Counted(qwen2_checkpoint, speculative_config=eagle3(head), **engine)
    assert llm.generate() == without_speculation(qwen2_checkpoint)
    llm.assert_accepted_and_rejected()


def test_eagle3_with_chunked_prefill_and_preemption_equals_no_speculation(qwen2_checkpoint, head):
    llm = Counted(qwen2_checkpoint, speculative_config=eagle3(head), max_num_batched_tokens=8,
                  num_gpu_blocks_override=28, max_model_len=96)
    assert llm.generate() == without_speculation(qwen2_checkpoint)
    assert llm.llm.engine.scheduler.total_preemptions > 0
    assert llm.drafted > 0


def test_pytorch_model_bin_heads_load_as_safetensors_ones(head, tmp_path):
    tensors = load_file(f"{head}/model.safetensors")
    shutil.copy(f"{head}/config.json", tmp_path)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    loaded = head_weights(str(tmp_path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def edited_head(qwen2_checkpoint, tmp_path, **config) -> str:
    """A head's config.json (no weights: refused before they load) with `config` changed."""
    path = build_eagle3_head(tmp_path / "head", qwen2_checkpoint, aux_layer_ids=AUX_LAYERS, with_weights=False)
    edited = {**json.loads((path / "config.json").read_text()), **config}
    (path / "config.json").write_text(json.dumps(edited))
    return str(path)


@pytest.mark.parametrize(("config", "error"), [
    ({"vocab_size": 1000}, "vocabulary of 1000 tokens"),
    ({"target_hidden_size": 32}, "hidden states of size 32"),
    ({"eagle_config": {}}, r"reads target layers \[2, 1, -1\]"),  # vLLM's default choice, for a 2-layer target
    ({"architectures": ["LlamaForCausalLM"]}, "not an EAGLE-3 head"),
    ({"num_hidden_layers": 2}, "only one-layer heads"),
])
def test_a_head_that_does_not_fit_the_target_is_refused(qwen2_checkpoint, tmp_path, config, error):
    with pytest.raises(ValueError, match=error):
        LLM(qwen2_checkpoint, speculative_config=eagle3(edited_head(qwen2_checkpoint, tmp_path, **config)), **ENGINE)


def test_prefix_cache_hits_reuse_the_heads_kv_with_unchanged_output(qwen2_checkpoint, head):
    llm = LLM(qwen2_checkpoint, speculative_config=eagle3(head), **ENGINE)
    llm.generate(PROMPTS, GREEDY)
    again = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in again] == without_speculation(qwen2_checkpoint)
    assert all(o.num_cached_tokens >= 8 for o in again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_feed_the_head_what_eager_steps_do(qwen2_checkpoint, head):
    """The target's layer inputs reach the head from captured graphs (decode and mixed) as from eager forwards."""
    cuda = {"device": "cuda", "dtype": "float32", "attention_backend": "triton", "block_size": 16,
            "kv_cache_memory": "64MiB"}
    plain = LLM(qwen2_checkpoint, **cuda).generate(PROMPTS, GREEDY)
    runs = []
    for enforce_eager in (False, True):
        llm = LLM(qwen2_checkpoint, speculative_config=eagle3(head), enforce_eager=enforce_eager, **cuda)
        proposed = record_proposals(llm)
        outputs = llm.generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain]
        runs.append(proposed)
    assert runs[0] == runs[1] and len(runs[0]) > 10
