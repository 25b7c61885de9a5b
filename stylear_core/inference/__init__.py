"""Inference: token ids in, token ids out (no HTTP here).

``engine`` (static-KV-cache, batched-CFG decoding and VQ decode), ``sampling`` (guidance, top-k,
temperature, per-request seeds), ``reference`` (the slow no-cache decode tests compare against),
``style_request`` (reference image -> style tokens), ``adapters`` (LoRA adapters on one base model),
``generator`` (the one front-end every generation path calls), ``defaults`` (the shared sampling settings),
``continuous`` (iteration-level batching: requests join and leave a pool of row slots between decode
steps) and ``multi_lora`` (rows with different LoRA adapters, or none, in one forward).
"""
