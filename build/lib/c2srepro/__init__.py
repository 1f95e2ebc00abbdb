"""c2srepro: transcoder circuit analysis for single-cell foundation models (cell2sentence).

The pieces, one module or folder each: ``cells`` / ``prompts`` / ``tokenizer`` (cells to tokenised
C2S prompts with a token-to-gene map), ``mini_c2s`` / ``models`` / ``predict`` (the models),
``transcoder`` (harvesting, training, replacement), ``features`` and ``enrichment`` (what features
fire on, and gene set enrichment), ``attribution`` / ``casestudy`` (circuits and their biology),
``book`` (the chapter runner) and ``scorecard``.
"""

__version__ = "0.1.0"
