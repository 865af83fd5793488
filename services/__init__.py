"""e3 services: thin network shells (config, adapters, API) over the e3 library."""
