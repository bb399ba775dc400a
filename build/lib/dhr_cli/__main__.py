"""`python -m dhr_cli` runs the CLI (also what torchrun launches)."""

from dhr_cli.cli import main

if __name__ == "__main__":
    main()
