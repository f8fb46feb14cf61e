"""Adapters: trainable low-rank (or otherwise small) updates on a frozen base model, all behind one interface
(base.py: AdapterConfig, attach / reattach / merge, trainable-parameter reports).

- peft_adapters.py: lora, dora, loha, vblora through peft (saved and exported in peft's own format);
- lora_xs.py: LoRA-XS (trainable r x r core between frozen SVD factors of W);
- mars.py: MARS (multi-adapter rank sharing: shared down-projections per attention / MLP block), opt 0 and 1;
- qlora.py: qlora and qmars, the LoRA / MARS branch on a frozen NF4 base with double quantisation;
- lobi_lora.py: HOLA's Lo-Bi path, a LoRA pair initialised from the SVD of the quantisation error on a frozen
  lobi mixed-precision base.
"""
