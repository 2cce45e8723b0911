"""Collection: what the edit is estimated from (cross-attention activations, or token embeddings)."""
