"""Evaluation metrics computed from generated videos (the synthetic world's pixel oracle is `data.oracle`)."""
