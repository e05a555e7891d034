"""The pipeline stages (one module each, run by `emoprune stage NAME`) and what they share: params, data, files, tracking."""
