"""The only door to the operating system.

`libc` binds the system calls through ctypes and turns errno into exceptions; `events` records each call
with its reason. Nothing else in the package calls the OS.
"""
