"""audience-sync: keep Optimizely Data Platform in step with your audiences and events."""

__version__ = "0.1.0"
