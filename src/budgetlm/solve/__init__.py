"""`budgetlm solve`: the best evaluated cell of a study under a budget, its Pareto neighbours, and pipelines to try.

choose.py   reads the results store only: each evaluated cell's score on a task and its figures (stored size, decode
            ms/token, peak RSS measured here, or projected for a device by hardware/devices.py), the most accurate
            cell meeting every limit, its neighbours on the accuracy-vs-size and accuracy-vs-speed fronts (the report's
            pareto_front), and the one-line error naming the closest cell when none meets them
propose.py  neighbouring settings of the best cells (bits 4 -> 3 / 8, group size 64 -> 32 / 128 ...), each checked by
            the method's own config and shape checks and never one the store already holds; `--run` adds them to the
            study's recipe (DIR/recipe.solve.yaml) and runs it with the study driver, which skips the finished cells
"""
