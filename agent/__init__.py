"""The creditmeter agent: meters GPU compute seconds on one host and ships signed records."""
