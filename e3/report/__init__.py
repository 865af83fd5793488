"""Reading a run's metrics and drawing its plots."""
