import time, torch
from loomserve.platform.request import Request, SamplingParams
from loomserve.platform.sampler import Sampler, build_sampling_metadata
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, V = 256, 152064
g = torch.Generator().manual_seed(0)
def reqs(**kw):
    return [Request(f"r{i}", torch.randint(0, V, (512,), generator=g).tolist(), SamplingParams(**kw), eos_token_id=0,
                    output_token_ids=torch.randint(0, V, (128,), generator=g).tolist()) for i in range(B)]
logits = torch.randn(B, V, generator=g).to(dev)
s = Sampler()
cases = {"greedy": dict(temperature=0.0), "temp": dict(temperature=0.8),
         "topk": dict(temperature=0.8, top_k=50), "topp": dict(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05),
         "seeded": dict(temperature=0.8, seed=1, logprobs=5), "penalties": dict(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5)}
for name, kw in cases.items():
    rs = reqs(**kw)
    t0 = time.perf_counter(); meta = build_sampling_metadata(rs, V, dev); 
    if dev.type == "cuda": torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(3): out = s(logits, meta)
    if dev.type == "cuda": torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"{name:10s} meta {1e3*(t1-t0):7.1f} ms  forward {1e3*(t2-t1)/3:7.2f} ms", out.sampled_token_ids[:4].tolist())
# seeded reproducible on device, across positions
one = [Request("a", [1], SamplingParams(temperature=1.0, seed=7))]
a = s(logits[:1], build_sampling_metadata(one, V, dev)).sampled_token_ids.item()
b = s(logits[[5, 0]], build_sampling_metadata(reqs(temperature=1.0)[:1] + one, V, dev)).sampled_token_ids[1].item()
print("seeded same across positions:", a == b, dev)
