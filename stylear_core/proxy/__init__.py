"""Proxy-Tuning: a DreamBooth-tuned diffusion supervisor teaches the AR model new subjects.

* :mod:`~stylear_core.proxy.subjects` - subject sets on disk (instance images, identifier, class noun);
* :mod:`~stylear_core.proxy.families` - the SDXL / SD3 supervisor families and ``load_supervisor``;
* :mod:`~stylear_core.proxy.dreambooth` - stage 1 for one subject: the DreamBooth LoRA recipe and loop;
  :mod:`~stylear_core.proxy.dreambooth_stage` runs it for every subject as Ray tasks;
* :mod:`~stylear_core.proxy.supervisor` - the tuned subjects and one sampler for all their LoRAs;
* :mod:`~stylear_core.proxy.prompts` - DreamBench's prompt list (evaluation) and proxy data's templates;
* :mod:`~stylear_core.proxy.proxy_data` (with :mod:`~stylear_core.proxy.proxy_actors`) - stage 2, proxy
  images generated, filtered and tokenized on Ray Data;
* :mod:`~stylear_core.proxy.subject_training` - stage 3, the AR student trained on them.
"""
