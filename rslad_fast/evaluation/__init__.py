"""The evaluation behind ``python -m rslad_fast.evaluate`` (the command line itself: ``rslad_fast/evaluate.py``;
the attacks and their registry: ``rslad_fast/attacks/eval_attacks.py``).

robustness.py  one model under the attacks: per-image results, the worst case, the threat-model, ordering
               and sanity checks
report.py      the report: the table in the paper's layout, eval.json and eval.md, written atomically
"""
