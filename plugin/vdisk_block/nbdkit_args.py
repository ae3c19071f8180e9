"""Facts about the nbdkit process the plugin API does not expose.

nbdkit 1.32 tells a plugin whether it serves read-only only per connection,
in open(). The chain must be opened (and locked) before the first connection,
so the entry script reads nbdkit's own command line to learn about -r.
"""

from __future__ import annotations

_SHORT_WITH_ARG = set("DegiPptUu")
_LONG_WITH_ARG = {"debug", "exportname", "filter", "group", "ipaddr", "log", "mask-handshake",
                  "pidfile", "port", "run", "selinux-label", "threads", "tls",
                  "tls-certificates", "tls-psk", "unix", "user"}


def readonly_from_argv(argv: list[str]) -> bool:
    """True if nbdkit's options (those before the plugin name) include -r."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--" or not arg.startswith("-") or arg == "-":
            return False
        if arg.startswith("--"):
            name, has_value = arg[2:].split("=", 1)[0], "=" in arg
            if name in ("readonly", "read-only"):
                return True
            if name in _LONG_WITH_ARG and not has_value:
                i += 1
            continue
        for j, ch in enumerate(arg[1:]):
            if ch == "r":
                return True
            if ch in _SHORT_WITH_ARG:
                if j == len(arg) - 2:
                    i += 1
                break
    return False


def process_argv() -> list[str]:
    with open("/proc/self/cmdline", "rb") as f:
        return [a.decode("utf-8", "replace") for a in f.read().split(b"\0")[:-1]]
