"""The Llama-family model: config, compact transformer, loaders and tokenizer."""
