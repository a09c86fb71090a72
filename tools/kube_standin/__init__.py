"""A stand-in Kubernetes API server for tests, built on kmock (see `server`)."""
