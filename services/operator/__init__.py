"""Tessera's Kubernetes operator (kopf): reconciles TesseraNode and ModelDeployment resources."""
