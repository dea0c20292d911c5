"""Evaluation: a trained model -> the bound's terms and, in validation mode, held-out metrics."""
