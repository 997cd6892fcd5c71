"""The extensions zone: features built on the core's public names only.

coe.py        Chain-of-Experts (re-routed passes through one layer's experts)
telemetry.py  routing telemetry (expert load, co-selection, drift)
compress/     pruning and merging experts from routing statistics
interop/      Hugging Face MoE blocks -> moe_dist layers; upcycling a dense FFN
"""
