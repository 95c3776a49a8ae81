"""From base model to assistant, stage by stage: base pretraining -> chat SFT -> DPO, with a report card.

config.py (the stages and the `cpu` / `gpu` / `tiny` presets), card.py (each stage's checkpoint measured:
depth on the held-out chat test split, breadth on the pretraining corpus, sample conversations), report.py
(the tables and report.md). The committed report card: docs/results/chat/.
"""
