"""The command line: one module per command, registered in app.py. Only this package imports typer or rich."""
