"""Running big graphs block by block: the cuts record, the partition plan, the runner and the decoder session."""
