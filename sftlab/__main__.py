from sftlab.cli import app

app()
