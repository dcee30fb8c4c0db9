"""Checkpoint reading (lazy, one shard open) and writing (sharded, atomic)."""
