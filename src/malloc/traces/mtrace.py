"""glibc's mtrace log: reading it into a trace, and writing a trace as one.

With `MALLOC_TRACE=FILE`, `libc_malloc_debug.so.0` loaded and `mtrace()` called, glibc logs one event a line:

    = Start                          tracing began (`= End`: muntrace)
    @ CALLER + 0xADDR 0xSIZE         malloc, calloc, memalign or realloc(NULL, SIZE) returned ADDR
    @ CALLER - 0xADDR                free(ADDR), or realloc(ADDR, 0)
    @ CALLER < 0xOLD                 realloc(OLD, SIZE) ...
    @ CALLER > 0xNEW 0xSIZE          ... returned NEW (always the line after its `<`)
    @ CALLER ! 0xOLD 0xSIZE          realloc(OLD, SIZE) failed, OLD untouched

`@ CALLER` is missing when glibc does not know the caller, and CALLER may hold spaces (a path), so a line is
read from its end. NULL prints as `(nil)`, and a size of 0 as `0`.
"""

from __future__ import annotations

import os
import re

from .model import ALLOC, FREE, REALLOC, Op, Trace, TraceError

_HEX = re.compile(r"0x[0-9a-fA-F]+|0")
_NIL = "(nil)"
_TWO_ARGS = frozenset("+>!")  # events with an address and a size
_ONE_ARG = frozenset("-<")  # events with an address only
_FIRST_ADDRESS = 0x10000  # where write_mtrace's made-up addresses start


def parse_mtrace(path: str | os.PathLike[str]) -> Trace:
    """Parse a glibc mtrace log (LF or CRLF line ends); TraceError naming the file and line if malformed.

    Each address returned is a new block. Its id is the one most recently released by a free (a new one if
    none is free), so `num_ids` is the most blocks live at once, and an address reused after a free is a new
    block, whatever its id. A realloc's `<`/`>` pair is one REALLOC of the old block's id, which the block
    keeps at its new address. `realloc(p, 0)` is logged by glibc as a free, and `realloc(NULL, n)` as a
    malloc, and so they are read.

    Only a malformed line is an error. A log says what happened in an order, and a log of several threads
    can hold events that no single thread could make (glibc writes each line after its call returns, so a
    free can be logged after its address was handed out again); glibc's own `mtrace` script reports these
    and goes on, and so does this reader.

    Tolerated, as the format allows, and counted in `skipped_frees`: a free of an address the log never
    returned (a block allocated before tracing began), and a realloc of one, whose new block becomes a malloc.
    A free of an address that the log returns later is one of these too: nothing in the log tells the two
    apart.

    Tolerated with a warning in `Trace.warnings` (FILE:LINE, what the log shows, what the replay does):
    - an address returned while the log still holds a live block there: that block's free is missing from
      the log; the replay frees it first;
    - a free of an address already freed in the log and not returned since (a double free, or a block whose
      allocation the log missed): the replay leaves the free out;
    - a realloc of such an address: the replay makes its new block a malloc.

    Not events at all: a free of `(nil)` is `free(NULL)` (id -1); a failed malloc (`(nil)` returned) and a
    failed realloc (`!`) change nothing and are left out.
    """
    where = os.fspath(path)
    ops: list[Op] = []
    append = ops.append
    live: dict[int, int] = {}  # address -> id of the block there
    born: dict[int, int] = {}  # address -> the line that last returned a block there
    freed: dict[int, int] = {}  # address -> the line that freed it, until the log returns it again
    spare: list[int] = []  # ids released by frees, reused last-released first
    warnings: list[str] = []
    num_ids = 0
    skipped = 0
    lineno = 0

    def fail(what: str) -> TraceError:
        return TraceError(f"{where}:{lineno}: {what}")

    def number(text: str, what: str) -> int:
        if text == _NIL and what == "address":
            return 0
        if _HEX.fullmatch(text) is None:
            raise fail(f"bad number: {what} {text!r} is not hexadecimal (0x...)")
        return int(text, 16)

    def warn(line: int, what: str) -> None:
        warnings.append(f"{where}:{line}: {what}")

    def forget(address: int) -> None:
        """The log returns `address`: a block still live there lost its free from the log."""
        freed.pop(address, None)
        stale = live.pop(address, None)
        if stale is not None:
            warn(lineno, f"{address:#x} returned while the block returned there on line {born[address]} is "
                         "live: its free is missing from the log (a thread's free logged late?); the replay "
                         "frees that block first")
            append((FREE, stale, 0))
            spare.append(stale)
        born[address] = lineno

    def new_block(address: int) -> int:
        nonlocal num_ids
        forget(address)
        if spare:
            ident = spare.pop()
        else:
            ident = num_ids
            num_ids += 1
        live[address] = ident
        return ident

    def never_live(address: int, line: int, what: str) -> None:
        """A free or realloc (`what`) on line `line` of an address with no live block."""
        nonlocal skipped
        if address in freed:
            fault, action = (("a double free", "leaves this free out") if what == "free" else
                             ("a use after free", "makes its new block a malloc"))
            warn(line, f"{what} of {address:#x}, already freed on line {freed[address]} and not returned since "
                       f"({fault}, or an allocation missing from the log); the replay {action}")
        else:
            skipped += 1  # a block from before the log

    pending: int | None = None  # the old address of a `<` line, until its `>` line
    pending_line = 0  # and that line's number
    with open(path, encoding="latin-1", newline="\n") as lines:
        for line in lines:
            lineno += 1
            fields = line.split()
            if not fields or fields[0] == "=":
                if pending is not None and fields:
                    raise fail(f"realloc: '<' on line {lineno - 1} is not followed by its '>' line")
                continue
            if len(fields) >= 3 and fields[-3] in _TWO_ARGS:
                event, args = fields[-3], fields[-2:]
            elif len(fields) >= 2 and fields[-2] in _ONE_ARG:
                event, args = fields[-2], fields[-1:]
            else:
                raise fail(f"unknown event {line.strip()!r} (expected '[@ CALLER] +|-|<|>|! ADDRESS [SIZE]')")
            if len(fields) > len(args) + 1 and fields[0] != "@":
                raise fail(f"unknown event {line.strip()!r}: text before the event that is not '@ CALLER'")
            address = number(args[0], "address")
            if pending is not None and event != ">":
                raise fail(f"realloc: '<' on line {lineno - 1} is not followed by its '>' line")
            if event == "+":
                size = number(args[1], "size")
                if address:
                    append((ALLOC, new_block(address), size))
            elif event == "-":
                if not address:
                    append((FREE, -1, 0))
                    continue
                ident = live.pop(address, None)
                if ident is None:
                    never_live(address, lineno, "free")
                else:
                    append((FREE, ident, 0))
                    spare.append(ident)
                    freed[address] = lineno
            elif event == "<":
                pending, pending_line = address, lineno
            elif event == ">":
                if pending is None:
                    raise fail("realloc: '>' line without the '<' line before it")
                size = number(args[1], "size")
                if not address:
                    raise fail("realloc: '>' line with a (nil) address (glibc logs a failed realloc with '!')")
                old = live.pop(pending, None)
                if old is None:
                    if pending:
                        never_live(pending, pending_line, "realloc")  # its new block is a malloc
                    append((ALLOC, new_block(address), size))
                else:
                    if address != pending:
                        freed[pending] = lineno
                    forget(address)
                    live[address] = old
                    append((REALLOC, old, size))
                pending = None
            else:
                number(args[1], "size")  # a failed realloc: nothing changed, but the line must still be sound
    if pending is not None:
        raise fail("realloc: the log ends after a '<' line, without its '>' line")
    name = os.path.basename(where)
    if name.endswith(".mtrace"):
        name = name[: -len(".mtrace")]
    return Trace(name, num_ids, tuple(ops), skipped, tuple(warnings))


def format_mtrace(trace: Trace) -> str:
    """The trace as an mtrace log, as glibc would have written it for a program making its requests.

    Addresses are made up (16-aligned, never reused), and there is no caller. What cannot carry over:
    glibc logs `realloc(p, 0)` as a free and `realloc(NULL, n)` (a realloc of an id not live) as a malloc,
    so they come back as those; a free of an id not live is `free(NULL)`, written as `- (nil)`; ids are
    assigned afresh when read back; and `skipped_frees` is not written.
    """
    addresses: dict[int, int] = {}  # live id -> its address
    next_address = _FIRST_ADDRESS
    out = ["= Start"]

    def fresh(ident: int, size: int) -> str:
        nonlocal next_address
        address = next_address
        next_address += max(16, (size + 15) & ~15) + 16
        addresses[ident] = address
        return hex(address)

    for code, ident, size in trace.ops:
        size_text = hex(size) if size else "0"
        old = addresses.get(ident)
        if code == FREE or (code == REALLOC and size == 0 and old is not None):
            if old is None:
                out.append(f"- {_NIL}")
            else:
                del addresses[ident]
                out.append(f"- {old:#x}")
        elif code == REALLOC and old is not None:
            out.append(f"< {old:#x}")
            out.append(f"> {fresh(ident, size)} {size_text}")
        else:
            out.append(f"+ {fresh(ident, size)} {size_text}")
    out.append("= End")
    out.append("")
    return "\n".join(out)


def write_mtrace(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Write the trace as a glibc mtrace log (see `format_mtrace` for what does not carry over)."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(format_mtrace(trace))
