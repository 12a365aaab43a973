"""What every side shares: configuration, data, models, the training loop and metrics.

This package imports no other mammofl room (see style.md: data flows one way).
"""
