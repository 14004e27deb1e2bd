"""A process and everything below it, from Linux /proc: the benchmarks' one walk of the process
table (CPU seconds of a server's tree, resident memory by role, a server's worker processes)."""

from __future__ import annotations

from pathlib import Path


def stat_fields() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after the command name (field 0 is the state, 1 the
    parent pid), by pid; processes that exit while the table is read are left out."""
    out: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            out[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
    return out


def subtree(root: int, stats: dict[int, list[str]]) -> set[int]:
    """``root`` and every process below it in ``stats`` (from ``stat_fields``)."""
    parents = {pid: int(fields[1]) for pid, fields in stats.items()}
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, pp in parents.items() if pp == pid and p not in tree]
        tree.update(children)
        frontier += children
    return tree


def cmdline(pid: int) -> str | None:
    """The process's command line with spaces between its arguments; None once it has exited."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
