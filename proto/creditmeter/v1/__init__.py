"""Wire contract of creditmeter, generated from the .proto files beside this module."""
