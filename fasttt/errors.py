"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input or state the user can fix; the CLI prints it as one line and exits 2."""


def exit_on_user_error(main):
    """Run `main()`; turn a UserError into `error: ...` on stderr and exit status 2."""
    import sys

    try:
        return main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
