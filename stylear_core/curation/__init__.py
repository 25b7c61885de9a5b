"""Data curation building blocks: the diffusion stylizer, the SAM style-region masker, raw/stylized mixing.

* :mod:`stylear_core.curation.stylizer` - SDXL + IP-Adapter (InstantStyle style-only) batch callable.
* :mod:`stylear_core.curation.sam` - salient-content removal from style references with SAM.
* :mod:`stylear_core.curation.mix` - reproducible raw : stylized selection.

Submodules are imported on use: the stylizer pulls in diffusers, the masker segment-anything.
"""
