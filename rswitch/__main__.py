from rswitch.cli import app

app()
