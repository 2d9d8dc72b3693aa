"""Interop: reading and writing other formats — torch pickles and checkpoints of the reference codes, orbax
checkpoints, run directories, TensorBoard event files. Depends on the math and the networks, never the reverse.
"""
