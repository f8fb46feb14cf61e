"""Distillation steps: `kd` (logit KD: forward or reverse KL at temperature T mixed with the task loss) and
`hidden_kd` (hidden-state matching with a layer map and a learned projection, plus logit KD), trained through
train.loop.fit against a teacher run on the fly or cached on disk as top-k log-probs. kd.py has the losses and
the steps, teacher.py the teacher (loading, tokenizer check, top-k cache), hidden.py the layer matching.
A recovery step after pruning is `kd` after the pruning step (teacher: the unpruned base by default) or an
adapter with `train:` (LoRA recovery)."""
