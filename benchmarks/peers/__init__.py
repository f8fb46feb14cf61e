"""Peer quantisers for benchmarks/quant_peers.py: one module per peer library (hqq, optimum-quanto, llama.cpp).

Each torch peer replaces the model's nn.Linear modules by a small wrapper that runs the peer's own quantised
layer and registers exactly the tensors the peer stores (packed codes, scales, zeros) as buffers, with
`layer_kind`, `in_features`, `out_features` and `storage_bytes()`, so budgetlm.hardware.size.model_size counts
the peer's real storage the same way it counts budgetlm's QuantLinear. The llama.cpp peer works on GGUF files.
"""
