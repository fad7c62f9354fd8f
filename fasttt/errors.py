"""The one exception type that reaches the user as a single line, and CLIs built on it."""

import argparse
import re
import sys


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (with the usage) and exit status 2, as every error."""

    def __init__(self, *args, usage_line: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.usage_line = usage_line

    def error(self, message):
        """Refuse bad arguments as a UserError naming the usage."""
        raise UserError(f"{message} (usage: {self.usage_line})")


def one_line(err: Exception) -> str:
    """An error's message as one printable line; of torch.load's weights-only refusal, the cause.

    Messages about damaged files can quote their bytes, newlines and terminal escapes
    included. torch's refusal also advises weights_only=False, wrong for an untrusted file.
    """
    text = str(err)
    if text.startswith("Weights only load failed"):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return f"unsupported global {found.group(1)}" if found else "objects other than tensors"
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def exit_on_user_error(main):
    """Run `main()`; a UserError or an OS error becomes `error: ...` on stderr and exit 2."""
    try:
        return main()
    except UserError as err:
        message = str(err)
    except OSError as err:  # disk full, permissions, a path that is a file: the user's to fix
        where = f": {err.filename}" if err.filename else ""
        message = f"{err.strerror or err}{where}"
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
