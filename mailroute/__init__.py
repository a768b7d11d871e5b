"""mailroute: two-stage email classification (bi-encoder retrieval + listwise cross-encoder rerank, fused with a flat
softmax classifier's log-probabilities).

This core package holds what every other part shares: the tensor contract, settings, the taxonomy,
email normalisation, the label index and the two-stage pipeline class that both the in-process
reference classifier and the Triton model run.
"""

__version__ = "0.1.0"
