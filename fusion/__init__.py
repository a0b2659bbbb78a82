"""WBC side: data, splits, frozen encoders, fusion models, training, sweep, report."""
