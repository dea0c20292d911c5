"""The mathematics: the forward process, the bound's terms and estimators, selection metrics.

Pure tensor functions: no Optuna, no training loops, no files (docs/theory.md).
"""
