"""Training: datasets, bi-encoder (MNR), hard-candidate mining, listwise cross-encoder, baseline, evaluation."""
