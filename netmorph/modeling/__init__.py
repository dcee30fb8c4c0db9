"""Self-contained modeling files (torch + transformers only), copied next to every converted checkpoint."""
