"""Demo data builders: the embedded DSPO demo (``dspo``), the BIQA demo (``biqa``), a tiny SeeSR (``tiny_seesr``)."""
