"""Text at the edges: tokenizers (SentencePiece, tokenizer.json), chat formats and the incremental detokenizer."""
