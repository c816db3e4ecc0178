"""Raw keystroke corpora → subject-grouped WebDataset shards plus a manifest."""
