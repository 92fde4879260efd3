"""Embedding and rerank throughput on a GPU: loomserve against sentence-transformers at its best, in one run.

Shapes (seeded random weights in real Hugging Face + sentence-transformers format, built into a temporary folder,
with all-MiniLM-L6-v2's real WordPiece tokenizer, so token counts are those of real text):
- minilm: all-MiniLM-L6-v2 (384 hidden, 6 layers, mean pooling, normalized),
- bge-base: bge-base-en-v1.5 (768 hidden, 12 layers, CLS pooling, normalized),
- qwen3-embedding-0.6b: Qwen3-Embedding-0.6B (a 28-layer decoder, last-token pooling, normalized),
- rerank: a cross-encoder of ms-marco-MiniLM-L-6-v2's shape (one label), pairs instead of sentences.

For each shape: sentence-transformers fp32 at batch 32 (its default); sentence-transformers fp16 at each of
--st-batch-sizes, the best one kept; loomserve's `LLM.embed` / `LLM.score` at the default dtype (bf16 on CUDA).
The best fp16 configuration and loomserve then run alternately --repeats times; medians give sentences/s. Vectors
are compared with sentence-transformers fp32 (min cosine; scores: max abs difference). Model load and a warm-up
pass are excluded; tokenization is included on both sides.

    python -m benchmarks.embeddings --device cuda --tokenizer PATH_TO_MINILM_FILES
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import device_name

_ST_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "lasttoken": "pooling_mode_lasttoken"}
_ST_FILES = ("config_sentence_transformers.json", "sentence_bert_config.json", "modules.json")
SHAPES: dict[str, dict[str, Any]] = {
    "minilm": {"bert": {}, "pooling": "mean"},
    "bge-base": {"bert": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072}, "pooling": "cls"},
    "qwen3-embedding-0.6b": {"qwen3": {"vocab_size": 151669, "hidden_size": 1024, "num_hidden_layers": 28,
                                       "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                                       "intermediate_size": 3072, "max_position_embeddings": 32768,
                                       "tie_word_embeddings": True}, "pooling": "lasttoken"},
    "rerank": {"bert": {"num_labels": 1}, "pooling": None},
}


def build_shape(name: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A seeded random checkpoint of the shape, with the tokenizer's files and sentence-transformers' modules."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, Qwen3Config, Qwen3Model

    shape = SHAPES[name]
    folder.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        if f.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(f, folder / f.name)
    torch.manual_seed(0)
    if "qwen3" in shape:
        model = Qwen3Model(Qwen3Config(**shape["qwen3"], architectures=["Qwen3Model"])).to(torch.bfloat16)
    else:
        config = BertConfig.from_pretrained(tokenizer_dir, **shape["bert"])
        model = (BertForSequenceClassification if name == "rerank" else BertModel)(config)
    model.save_pretrained(folder)
    if shape["pooling"] is not None:
        for f in _ST_FILES:
            shutil.copy(tokenizer_dir / f, folder / f)
        (folder / "1_Pooling").mkdir()
        mode = {"word_embedding_dimension": model.config.hidden_size, _ST_POOLING_KEYS[shape["pooling"]]: True}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(mode))
    return folder


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def contest(reference: Callable[[torch.dtype], Callable[[int], Any]], loomserve: Callable[[], Any],
            args: argparse.Namespace) -> dict[str, Any]:
    """`reference(dtype)` loads sentence-transformers and returns its run at a batch size. Its fp32 run at batch 32
    gives the reference outputs; its fp16 run at the fastest of --st-batch-sizes and `loomserve` then alternate."""
    st32 = reference(torch.float32)
    st32(32)
    t32, ref = timed(lambda: st32(32))
    st16 = reference(torch.float16)
    by_batch = {}
    for b in args.st_batch_sizes:
        st16(b)
        by_batch[b] = timed(functools.partial(st16, b))[0]
    batch = min(by_batch, key=by_batch.get)
    loomserve()
    times: dict[str, list[float]] = {"st16": [], "loomserve": []}
    for _ in range(args.repeats):
        seconds, _ = timed(functools.partial(st16, batch))
        times["st16"].append(seconds)
        seconds, ours = timed(loomserve)
        times["loomserve"].append(seconds)
    return {"st32": [t32], "st16_batch": batch, **times, "reference": ref, "ours": ours}


def bench_embed(path: Path, sentences: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from loomserve import LLM

    def reference(dtype: torch.dtype) -> Callable[[int], Any]:
        st = SentenceTransformer(str(path), device="cuda", model_kwargs={"dtype": dtype})
        return lambda batch: st.encode(sentences, batch_size=batch, convert_to_tensor=True)

    llm = LLM(str(path), **args.llm_kwargs)
    r = contest(reference, lambda: llm.embed(sentences), args)
    ours = torch.tensor([o.outputs.embedding for o in r.pop("ours")])
    r["min_cosine"] = torch.nn.functional.cosine_similarity(ours, r.pop("reference").float().cpu()).min().item()
    r["token_budget"] = llm.config.scheduler_config.max_num_batched_tokens
    return r


def bench_rerank(path: Path, sentences: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    from loomserve import LLM

    queries = [s for s in sentences if len(s.split()) <= 10][:50]
    passages = [s for s in sentences if len(s.split()) > 10]
    pairs = [(queries[i % len(queries)], passages[i % len(passages)]) for i in range(len(sentences))]
    first, second = [a for a, _ in pairs], [b for _, b in pairs]

    def reference(dtype: torch.dtype) -> Callable[[int], Any]:
        ce = CrossEncoder(str(path), device="cuda", model_kwargs={"dtype": dtype})
        return lambda batch: ce.predict(pairs, batch_size=batch)

    llm = LLM(str(path), **args.llm_kwargs)
    r = contest(reference, lambda: llm.score(first, second), args)
    ours = torch.tensor([o.outputs.score for o in r.pop("ours")])
    r["max_abs_diff"] = (ours - torch.as_tensor(r.pop("reference")).float()).abs().max().item()
    return r


def report(results: dict[str, Any], n: int) -> str:
    lines = [f"GPU embeddings: {results['gpu']}, torch {results['torch']}, sentence-transformers "
             f"{results['sentence_transformers']}; {n:,} sentences (rerank: pairs) of 3-80 words; medians of "
             "alternating runs.", "",
             "| shape | st fp32 b32 /s | st fp16 best /s (batch) | loomserve /s | loomserve / st fp16 | vectors |",
             "|---|---:|---:|---:|---:|---|"]
    for shape, r in results["shapes"].items():
        rate = {k: n / statistics.median(r[k]) for k in ("st32", "st16", "loomserve")}
        check = (f"min cosine {r['min_cosine']:.6f}" if "min_cosine" in r
                 else f"score max abs diff {r['max_abs_diff']:.1e}")
        lines.append(f"| {shape} | {rate['st32']:,.0f} | {rate['st16']:,.0f} ({r['st16_batch']}) | "
                     f"{rate['loomserve']:,.0f} | **{rate['loomserve'] / rate['st16']:.2f}x** | {check} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, sentences: list[str]) -> None:
    import tempfile

    import sentence_transformers

    results: dict[str, Any] = {"gpu": device_name(torch.device("cuda")), "torch": torch.__version__,
                               "sentence_transformers": sentence_transformers.__version__, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            path = build_shape(shape, args.tokenizer, Path(tmp) / shape)
            bench = bench_rerank if shape == "rerank" else bench_embed
            results["shapes"][shape] = bench(path, sentences, args)
            gc.collect()
            torch.cuda.empty_cache()
            print(shape, json.dumps(results["shapes"][shape]), flush=True)
    print(report(results, len(sentences)))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
