"""The instance scorers, one module each, and what they share (:mod:`.base`).

``metric`` (:mod:`.metric`), ``biqa`` (:mod:`.biqa`), ``vlm`` (:mod:`.vlm`) and ``human`` (:mod:`.human`);
:mod:`dspo_basicsr.preference.instance_scoring` builds one from options and scores a sample's instances.
"""
