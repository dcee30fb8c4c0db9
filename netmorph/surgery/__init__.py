"""The surgeries: what each checkpoint-writing command changes. Everything else — resolving the source, planning on
meta tensors, streaming into an atomic output directory, verification, the pass rule, the model card — is the
pipeline's (netmorph/pipeline.py).

A surgery is a `pipeline.Surgery` subclass in one file here: its constructor checks the source and builds the target
config (and whatever plan it needs) without reading a tensor; `stream(reader, writer)` writes every output tensor;
optional hooks add files, bit-level checks, verification settings and the model card's text. A new command is that
file and one click command in netmorph/cli.py calling `pipeline.run(TheSurgery, source, output_dir, options)`.

- diff.py — `convert-diff-transformer`: attention → differential attention (V1, DIFF V2) or the stock DiffLlama.
- grow.py — `grow`: depth, MLP width, heads, KV heads, head_dim, hidden size, exactly.
- qkv_layout.py — `qkv-layout`: q/k/v rows in another layout, bit for bit.
"""
