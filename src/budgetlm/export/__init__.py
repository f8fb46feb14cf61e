"""Export: write budgetlm models in formats other runtimes load (GGUF for llama.cpp: budgetlm.export.gguf)."""
