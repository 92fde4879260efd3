"""LoRA and QLoRA serving: PEFT adapters loaded at run time, many in one batch over one base model.

`lora.py` reads and checks PEFT adapter folders, `layers.py` wraps the model's linear layers with stacked
per-slot adapter weights, `ops.py` is the batched multi-adapter math, `manager.py` keeps adapters in slots
and a CPU cache, `scheduling.py` caps the adapters of a step, `registry.py` is the front end's name table.
"""

from loomserve.adapters.request import LoRARequest

__all__ = ["LoRARequest"]
