"""Cells in: AnnData to C2S cell sentences, prompts, the tokenizer with its token-to-gene map, and
the bundled datasets with their labelled train/held-out split."""
