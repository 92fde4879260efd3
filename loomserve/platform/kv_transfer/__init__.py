"""KV connectors: KV blocks beyond the device's pool, each a feature with a scheduler half (which blocks move, when
a request may run) and a worker half (the copies), as vLLM's KV connector API arranges it.

`offload.py`: the CPU tier of the prefix cache (`--kv-offloading-size`). `host_pool.py` keeps its bookkeeping
beside the scheduler, `copier.py` moves the bytes in the runner.
"""
