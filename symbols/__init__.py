"""The original release's graph written with mx.sym: the parity reference for icd.model."""
