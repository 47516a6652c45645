"""`python -m byzjax` and the installed `byzjax` command: the command line."""


def main() -> None:
    """Restarts with the tuned malloc (`byzjax._allocator`) before the command line
    imports jax: the restart replaces the process image, so anything imported
    before it is imported twice (jax and byzjax took about 6 s to import on the
    2-core AMD VM)."""
    from byzjax._allocator import reexec_tuned

    reexec_tuned()
    from byzjax.cli import entry

    entry()


if __name__ == "__main__":
    main()
