"""A program in a real pseudo-terminal, and the screen a user would see.

``Terminal`` spawns a child with pexpect in an 80x24 pty and feeds every byte
it writes into a pyte emulator, so tests assert on what is *displayed* (after
cursor movement, erasing and redrawing), not on the raw escape-laden stream.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pexpect
import pyte

ROWS, COLUMNS = 24, 80


class Terminal:
    """One child process on an 80-column terminal (24 rows unless ``rows`` says more), with its screen."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None, rows: int = ROWS
    ) -> None:
        #: Answer the child's cursor-position queries (ESC [6n), as a real terminal does.
        self.answers_cursor_queries = False
        self.screen = pyte.Screen(COLUMNS, rows)
        self.stream = pyte.ByteStream(self.screen)
        #: Everything the child has written, undecoded (for checks on what was ever sent).
        self.output = bytearray()
        self.child = pexpect.spawn(
            argv[0],
            argv[1:],
            env=env if env is not None else dict(os.environ),
            cwd=cwd,
            dimensions=(rows, COLUMNS),
            encoding=None,
            echo=True,
        )

    # ------------------------------------------------------------------ reading

    def pump(self, wait: float = 0.05) -> bool:
        """Read whatever the child has written within ``wait`` seconds; False once it has closed."""
        try:
            data = self.child.read_nonblocking(65536, timeout=wait)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        self.output.extend(data)
        self.stream.feed(data)
        if self.answers_cursor_queries:
            # As real terminals and tmux do: prompt_toolkit draws its bottom bar only where they are answered.
            for _ in range(data.count(b"\x1b[6n")):
                cursor = self.screen.cursor
                self.child.send(f"\x1b[{cursor.y + 1};{cursor.x + 1}R".encode())
        return True

    @property
    def lines(self) -> list[str]:
        """The screen's rows, right-stripped."""
        return [line.rstrip() for line in self.screen.display]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def unfolded(self) -> str:
        """The screen's lines as the client wrote them, before it folded them to the terminal's width:
        each row that continues a line (indented by four spaces) joined to the one before it with a
        space, as a fold ends a row where a space was (a word too long for a row gets one too)."""
        joined: list[str] = []
        for row in self.lines:
            if joined and row.startswith("    "):
                joined[-1] += " " + row[4:]
            else:
                joined.append(row)
        return "\n".join(joined)

    @property
    def cursor_row(self) -> str:
        return self.lines[self.screen.cursor.y]

    def wait_until(self, predicate: Callable[[Terminal], bool], timeout: float, what: str = "") -> None:
        """Pump until ``predicate(self)`` holds; raise AssertionError showing the screen if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return
            if time.monotonic() > deadline:
                break
            if not self.pump():
                if predicate(self):
                    return
                raise AssertionError(f"the program ended before {what or predicate!r}; screen:\n{self.text}")
        raise AssertionError(f"timed out waiting for {what or predicate!r}; screen:\n{self.text}")

    def wait_for_text(self, text: str, timeout: float) -> None:
        self.wait_until(lambda terminal: text in terminal.text, timeout, repr(text))

    def wait_for_line(self, text: str, timeout: float) -> None:
        """Wait until ``text`` is in a line on the screen, however the client folded it (``unfolded``)."""
        self.wait_until(lambda terminal: text in terminal.unfolded, timeout, repr(text))

    def settle(self, quiet: float = 0.3) -> None:
        """Pump until the child has been silent for ``quiet`` seconds (it is waiting for us)."""
        before = len(self.output)
        while self.pump(quiet) and len(self.output) != before:
            before = len(self.output)

    # ------------------------------------------------------------------ writing

    def type(self, keys: str) -> None:
        self.child.send(keys.encode())

    def wait_exit(self, timeout: float) -> int:
        """Pump to end of output, wait for the child; returns its exit status (or -signal)."""
        deadline = time.monotonic() + timeout
        while self.pump(0.1):
            if time.monotonic() > deadline:
                raise AssertionError(f"the program did not exit; screen:\n{self.text}")
        while self.child.isalive():
            if time.monotonic() > deadline:
                raise AssertionError(f"the program did not exit; screen:\n{self.text}")
            time.sleep(0.05)
        self.child.close()
        if self.child.signalstatus is not None:
            return -self.child.signalstatus
        return self.child.exitstatus

    def close(self) -> None:
        """Kill the child if still running and release the pty. Safe to call twice."""
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close(force=True)
