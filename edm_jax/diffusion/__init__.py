"""The papers' math: forward processes, preconditioning, losses, schedules, samplers, guidance, augmentation.

Pure functions and frozen dataclasses of hyperparameters; nothing here reads a config, touches files or
imports a driver (training, generation, evaluation, interop). `tests/test_layers.py` checks that.
"""
