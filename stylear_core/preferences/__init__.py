"""Preference pairs for DPO, generated rather than trained.

* :mod:`~stylear_core.preferences.pairs`: K samples per held (prompt, style reference) drawn with the SFT
  model through the generator front-end, ranked by CLIP style and text scores into chosen / rejected pairs
  (``stylear.preference_pairs/1``), as Ray Data actors.
* :mod:`~stylear_core.preferences.reference`: DPO's reference log-probs of each pair, scored once under the
  SFT model (by the sampler as it makes the pairs, or a Ray Data map over older pair files) and keyed by
  a digest of the SFT adapter and the style-noise strength.
* :mod:`~stylear_core.preferences.stage`: the ``make_preferences`` stage (config, request rows, the run
  and its summary) around :mod:`~stylear_core.preferences.pairs`.
"""
