"""Allocation traces: parsers for recorded request sequences, to replay through an allocator."""
