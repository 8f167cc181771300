"""Local Hugging Face checkpoints: files and roles, the one loader (trust_remote_code decided here), tiny and released-shape generators, streamed models."""
