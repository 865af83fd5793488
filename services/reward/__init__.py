"""The reward service: scores responses over HTTP with e3.verify."""
