"""Evaluation metrics computed from generated videos."""
