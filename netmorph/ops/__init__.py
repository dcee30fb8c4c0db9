"""Pure tensor functions: no files, no nn.Module. Each takes tensors and plain values and returns tensors."""
