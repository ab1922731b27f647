"""Engine integrations. Only subpackages here import an engine."""
