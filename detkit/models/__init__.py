"""Detector parts and assemblies."""
