"""Checkpoint and shard file I/O: the sharded MoE layout (placement, writers, readers, consolidation)."""
