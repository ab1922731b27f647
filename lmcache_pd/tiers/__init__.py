"""CPU and disk tiers that keep KV chunks for reuse across requests."""
