"""LoRA adapters as artefacts: one home for their layout, reading, writing, probing and publishing.

* :mod:`~stylear_core.adapters.format`: the directory layout (file names, manifest format, the name
  rule) and the adapter errors; torch-free, so the HTTP layer can validate names without the model stack.
* :mod:`~stylear_core.adapters.io`: write, read, list and load adapter directories.
* :mod:`~stylear_core.adapters.probe`: the probe an export records and ``verify_adapter`` reruns.
* :mod:`~stylear_core.adapters.publish`: the parity check and the one atomic publish under an adapters root.

Training turns checkpoints into adapters (:mod:`stylear_core.training.export`); serving copies them into
its LoRA slot (:mod:`stylear_core.inference.adapters`). Both use this package; it uses neither.
"""
