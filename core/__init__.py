"""The service's own plumbing: settings, error answers, the body limit, /health."""
