"""Models: load any HF causal LM (Hub id or local path), and the embedded tiny Llama with its trainer."""
