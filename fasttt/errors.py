"""The one exception type that reaches the user as a single line."""

import sys


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits 2."""


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
