"""Demo and test builders: the embedded DSPO demo (``dspo``), the BIQA demo (``biqa``), tiny components
(``tiny_components``), the tiny framework types (``tiny_arch``, registered on ``import dspo_basicsr``) and a tiny
SeeSR in the released layouts (``tiny_seesr``)."""
