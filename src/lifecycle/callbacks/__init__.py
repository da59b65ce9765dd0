"""Lightning callbacks: EMA weights, validation samples and scores, the reward curve."""
