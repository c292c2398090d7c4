"""Training side of DeepMarket: job bundles, the MultiWorkerMirroredStrategy worker, the digits demo."""
