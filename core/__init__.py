"""The service's own plumbing: what the app uses that no route needs to know."""
