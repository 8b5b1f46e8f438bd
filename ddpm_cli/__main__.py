"""`python -m ddpm_cli` runs the same Typer app as the `ddpm` console script."""
from ddpm_cli.cli.app import main

if __name__ == "__main__":
    main()
