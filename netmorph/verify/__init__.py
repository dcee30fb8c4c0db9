"""Verification: two models on the same real text. `compare` runs both whole models (logits, KL, loss, perplexity,
greedy generation on a padded batch with the KV cache, the output's tokenizer); `layerwise` holds one decoder layer of
each in memory at a time (models larger than RAM). The policy that picks one — and the pass rule — is the
pipeline's (netmorph/pipeline.py)."""
