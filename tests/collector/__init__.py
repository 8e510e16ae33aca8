"""Tests of the collector (creditmeter.collector)."""
