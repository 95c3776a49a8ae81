"""How much is pretraining worth? Data efficiency, effective data transferred, every task and strategy.

config.py (the sweep and its presets), analysis.py (choices on validation, the transfer fit, the
comparisons and conclusions), transfer.py (effective data transferred and its fit), report.py
(tables, figures, Markdown, LaTeX). The committed report: docs/results/pretrain_vs_finetune/.
"""
