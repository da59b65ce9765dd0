"""Lightning callbacks: EMA weights, sample videos."""
