"""Seeing inside: the process's address space, the heap's chunks, and reports about them."""
