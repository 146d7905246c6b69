"""Llama-2 model: config presets, the model, Hugging Face interop and sampling."""
