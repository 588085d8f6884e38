"""ttdl: training segmenters with a diagnostic text description loss (shared module)."""
