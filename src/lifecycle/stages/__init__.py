"""Training stages: one LightningModule per phase of a model's life."""
