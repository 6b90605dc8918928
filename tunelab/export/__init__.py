"""Shipping a fine-tuned model: GGUF files (for llama.cpp and Ollama) out, GGUF bases in.

- `gguf_tensors.py`: Hugging Face weights -> GGUF tensors and hyperparameters, per architecture;
- `gguf_vocab.py`: the tokenizer (vocabulary, merges, special tokens, chat template) as GGUF metadata;
- `gguf_out.py`: `export_gguf`, the whole export (source -> model -> file, Modelfile, model card);
- `modelfile.py`: Ollama's `Modelfile` beside the file (chat template in Ollama's syntax, stop tokens);
- `gguf_in.py`: a `.gguf` file named as `model.name_or_path`, loaded dequantised through transformers.
"""
