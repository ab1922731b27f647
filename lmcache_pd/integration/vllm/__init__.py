"""vLLM integration: the LMCachePDConnector (the only place that imports vLLM)."""
